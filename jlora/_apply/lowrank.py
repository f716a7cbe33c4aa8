"""``LowRank``: what flows through the interpreter where a LoRA kernel would.

A ``LowRank`` value stands for ``base + scale · einsum(a, b)``: ``base`` is the
frozen kernel after the same structural ops the model applied to it
(transposes, reshapes, casts, slices), and ``a`` / ``b`` are the factors with
their axes *labelled*. Every value axis carries a ``Label``; ``a`` holds the
labels of the input axes, ``b`` those of the output axes, both hold the
stacked (batch) axes and the ``RANK`` label. Structural ops only relabel or
reshape the small factors; consumers (matmul, conv, lookup) contract the
layer input with one factor and then the other, so the dense ``W0 + BA`` is
never built.

In *probe* mode (``jlora.infer_layout``) ``a`` and ``b`` are ``None`` and the
labels only carry provenance (which original kernel axes an axis came from).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jlora._errors import Unsupported
from jlora._lazy import LazyBase
from jlora._tree import describe_leaf
from jlora._weight import LoraSpec, LoraWeight

_uid = itertools.count()


@dataclasses.dataclass(frozen=True)
class Label:
  uid: int
  axes: frozenset  # original kernel axes this value axis derives from


RANK = Label(-1, frozenset())
_SPECIAL: dict[str, Label] = {"rank": RANK}


def special_label(name: str) -> Label:
  """The label of a special (non-kernel) factor axis such as ``"rank"`` or ``"slot"``."""
  if name not in _SPECIAL:
    _SPECIAL[name] = Label(-1 - len(_SPECIAL), frozenset())
  return _SPECIAL[name]


def is_special(label: Label) -> bool:
  return label.uid < 0


def new_label(axes: frozenset = frozenset()) -> Label:
  return Label(next(_uid), frozenset(axes))


@dataclasses.dataclass(frozen=True)
class Source:
  """Which LoRA kernel a value comes from."""

  path: str
  spec: LoraSpec | None  # None in probe mode and for frozen lazy kernels
  index: int


def prov(labels) -> frozenset:
  out = frozenset()
  for l in labels:
    out |= l.axes
  return out


@jax.tree_util.register_pytree_node_class
class LowRank:
  """A kernel value in the apply path: its base plus named, labelled factors.

  ``factors[name]`` is an array whose axes carry ``flabels[name]``: labels of
  value axes (kernel axes after the structural ops so far) and special labels
  (``RANK``, a bank's slot axis...). ``mode`` is ``"lora"`` (an adapter),
  ``"probe"`` (``infer_layout``: no factors, labels carry provenance only) or
  ``"frozen"`` (a lazy kernel without adapter: no factors). ``base`` is an
  array, or a ``jlora._lazy.LazyBase`` for kernels stored in another form.
  """

  __slots__ = ("base", "factors", "labels", "flabels", "source", "dropped", "mode")

  def __init__(self, base, factors, labels, flabels, source, dropped=frozenset(), mode="lora"):
    self.base = base
    self.factors = dict(factors)
    self.labels = tuple(labels)
    self.flabels = {k: tuple(v) for k, v in flabels.items()}
    self.source = source
    self.dropped = frozenset(dropped)
    self.mode = mode

  # -- pytree ------------------------------------------------------------------
  def tree_flatten(self):
    names = tuple(self.factors)
    aux = (names, self.labels, self.flabels, self.source, self.dropped, self.mode)
    return (self.base, *(self.factors[n] for n in names)), aux

  @classmethod
  def tree_unflatten(cls, aux, children):
    names, labels, flabels, source, dropped, mode = aux
    return cls(children[0], dict(zip(names, children[1:])), labels, flabels, source, dropped, mode)

  def __repr__(self) -> str:
    kids = ", ".join(f"{n}={describe_leaf(v)}" for n, v in (("base", self.base), *self.factors.items()))
    return f"LowRank({kids}, path={getattr(self.source, 'path', self.source)!r})"

  # -- construction ------------------------------------------------------------
  @classmethod
  def from_weight(cls, w: LoraWeight, base: Any, source: Source) -> "LowRank":
    spec = w.spec
    labels = [new_label(frozenset({i})) for i in range(len(spec.shape))]
    flabels = {name: [labels[ax] if isinstance(ax, int) else special_label(ax) for ax in axes]
               for name, axes in spec.factor_axes.items()}
    return cls(base, w.factors, labels, flabels, source)

  @classmethod
  def probe(cls, base: Any, source: Source) -> "LowRank":
    labels = [new_label(frozenset({i})) for i in range(base.ndim)]
    return cls(base, {}, labels, {}, source, mode="probe")

  @classmethod
  def frozen(cls, base: Any, source: Source) -> "LowRank":
    """A lazy kernel without adapter: only its base is computed with."""
    labels = [new_label(frozenset({i})) for i in range(base.ndim)]
    return cls(base, {}, labels, {}, source, mode="frozen")

  @property
  def is_probe(self) -> bool:
    return self.mode == "probe"

  @property
  def has_factors(self) -> bool:
    return self.mode == "lora"

  @property
  def path(self) -> str:
    return self.source.path

  @property
  def a(self):
    return self.factors["a"]

  @property
  def b(self):
    return self.factors["b"]

  @property
  def a_labels(self):
    return self.flabels["a"]

  @property
  def b_labels(self):
    return self.flabels["b"]

  def _new(self, base, factors=None, labels=None, flabels=None, dropped=None):
    return LowRank(
        base,
        self.factors if factors is None else factors,
        self.labels if labels is None else labels,
        self.flabels if flabels is None else flabels,
        self.source,
        self.dropped if dropped is None else dropped,
        self.mode,
    )

  # -- label sets ---------------------------------------------------------------
  @property
  def shared(self) -> frozenset:
    return frozenset(self.a_labels) & frozenset(self.b_labels) - {l for l in self.a_labels if is_special(l)}

  @property
  def a_only(self) -> frozenset:
    return frozenset(self.a_labels) - frozenset(self.b_labels)

  @property
  def b_only(self) -> frozenset:
    return frozenset(self.b_labels) - frozenset(self.a_labels)

  def holders(self, label: Label) -> frozenset:
    """Names of the factors carrying ``label``."""
    return frozenset(n for n, fl in self.flabels.items() if label in fl)

  # -- structural ops -------------------------------------------------------------
  def with_base(self, base) -> "LowRank":
    return self._new(base)

  def transpose(self, perm: Sequence[int], base) -> "LowRank":
    return self._new(base, labels=[self.labels[p] for p in perm])

  def _canonical(self, name):
    """Factor ``name`` transposed to (its value labels in value order..., its special labels)."""
    f, f_labels = self.factors[name], self.flabels[name]
    order = [l for l in self.labels if l in f_labels] + [l for l in f_labels if l not in self.labels]
    perm = [f_labels.index(l) for l in order]
    return jnp.transpose(f, perm), order

  def reshape(self, new_shape: Sequence[int], base) -> "LowRank":
    old_shape = tuple(self.base.shape)
    new_shape = tuple(new_shape)
    groups = _reshape_groups(old_shape, new_shape)
    new_labels: list[Label] = [RANK] * len(new_shape)
    group_holders: list[frozenset] = []
    for gi, gj in groups:
      old = [self.labels[i] for i in gi]
      nonunit = [l for i, l in zip(gi, old) if old_shape[i] != 1]
      new_nonunit = [j for j in gj if new_shape[j] != 1]
      holders = frozenset()
      if not self.is_probe and self.factors:
        sets = {self.holders(l) for l in nonunit}
        if len(sets) > 1:
          raise Unsupported("a reshape merges input-side and output-side kernel axes into one axis")
        holders = sets.pop() if sets else frozenset({"a"})
      keep = len(nonunit) == 1 and len(new_nonunit) == 1 and (
          old_shape[self.labels.index(nonunit[0])] == new_shape[new_nonunit[0]])
      for j in gj:
        if keep and j == new_nonunit[0]:
          new_labels[j] = nonunit[0]
        elif new_shape[j] == 1:
          new_labels[j] = new_label()
        else:
          new_labels[j] = new_label(prov(nonunit))
      group_holders.append(holders)
    carried = prov(new_labels)
    dropped = self.dropped | frozenset(
        ax for l in self.labels if l not in new_labels for ax in l.axes if ax not in carried)
    if self.is_probe or not self.factors:
      return self._new(base, labels=new_labels, dropped=dropped)

    factors, flabels = {}, {}
    for name in self.factors:
      f_c, order = self._canonical(name)
      specials = [l for l in order if is_special(l) or l not in self.labels]
      shape, labels = [], []
      for (_, gj), holders in zip(groups, group_holders):
        if name in holders:
          for j in gj:
            shape.append(new_shape[j])
            labels.append(new_labels[j])
      factors[name] = jnp.reshape(f_c, (*shape, *f_c.shape[len(f_c.shape) - len(specials):]))
      flabels[name] = labels + specials
    return LowRank(base, factors, new_labels, flabels, self.source, dropped, self.mode)

  def slice_axes(self, axis_slices: dict[int, tuple], base, dynamic: bool) -> "LowRank":
    """Slices value axes; ``axis_slices[axis] = (start, size, stride)``."""
    factors = dict(self.factors)
    for axis, (start, size, stride) in axis_slices.items():
      label = self.labels[axis]
      for name, f_labels in self.flabels.items():
        if label not in f_labels:
          continue
        k = f_labels.index(label)
        f = factors[name]
        if dynamic:
          f = lax.dynamic_slice_in_dim(f, start, size, axis=k)
        else:
          f = lax.slice_in_dim(f, start, start + (size - 1) * stride + 1, stride, axis=k)
        factors[name] = f
    return self._new(base, factors=factors)

  def scale_factor(self, name: str, c, base) -> "LowRank":
    """``base`` (already scaled) with factor ``name`` multiplied by the scalar ``c``."""
    if not self.factors:
      return self._new(base)
    f = self.factors[name]
    return self._new(base, factors={**self.factors, name: f * jnp.asarray(c, f.dtype)})

  def scale_by(self, c, base) -> "LowRank":
    if not self.factors:
      return self._new(base)
    return self.source.spec.variant.scale_kernel(self, c, base)

  def map_factors(self, fn, base) -> "LowRank":
    return self._new(base, factors={n: fn(f) for n, f in self.factors.items()})

  # -- scan support ------------------------------------------------------------------
  def scan_split(self):
    """Children with the first value axis moved to the front, and a rebuild fn for slices."""
    label = self.labels[0]
    rest = self.labels[1:]
    lazy = isinstance(self.base, LazyBase)
    base_children, base_rebuild = self.base.scan_split() if lazy else (self.base, None)
    if not self.factors:
      dropped = self.dropped | label.axes
      mode = self.mode

      def rebuild(children):
        b = base_rebuild(children[0]) if lazy else children[0]
        return LowRank(b, {}, rest, {}, self.source, dropped, mode)

      return (base_children,), rebuild
    holders = self.holders(label)
    if holders != frozenset(self.factors):
      raise Unsupported(
          "lax.scan slices this kernel along an axis that is not a stacked (batch) axis of the "
          "adapter; give the kernel a layout with batch_axes=(0,)"
      )
    names = tuple(self.factors)
    moved = [jnp.moveaxis(self.factors[n], self.flabels[n].index(label), 0) for n in names]
    flabels = {n: tuple(l for l in self.flabels[n] if l != label) for n in names}

    def rebuild(children):
      b = base_rebuild(children[0]) if lazy else children[0]
      return LowRank(b, dict(zip(names, children[1:])), rest, flabels, self.source, self.dropped, self.mode)

    return (base_children, *moved), rebuild

  # -- dense fallback -------------------------------------------------------------------
  def dense_base(self) -> jax.Array:
    return self.base.materialize() if isinstance(self.base, LazyBase) else self.base

  def dense(self) -> jax.Array:
    """``base + scale·(a⊗b)`` computed in float32 and cast to ``base.dtype`` (opt-in only)."""
    base = self.dense_base()
    if not self.factors:
      return base
    if set(self.factors) != {"a", "b"}:
      raise Unsupported(f"merging a {self.source.spec.variant.name!r} adapter on the fly")
    letters = Letters()
    spec = f"{letters(self.a_labels)},{letters(self.b_labels)}->{letters(self.labels)}"
    d = jnp.einsum(spec, self.a.astype(jnp.float32), self.b.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)
    out = base.astype(jnp.float32) + self.source.spec.scale * d
    return out.astype(base.dtype)


class Letters:
  """Assigns einsum letters to labels."""

  _ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

  def __init__(self):
    self.map: dict[Label, str] = {}

  def __call__(self, labels) -> str:
    out = []
    for l in labels:
      if l not in self.map:
        if len(self.map) >= len(self._ALPHABET):
          raise Unsupported("too many axes for an einsum")
        self.map[l] = self._ALPHABET[len(self.map)]
      out.append(self.map[l])
    return "".join(out)


def _reshape_groups(old: tuple[int, ...], new: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
  """Splits a reshape into groups of consecutive axes with equal products."""
  groups = []
  i = j = 0
  while i < len(old) or j < len(new):
    oi = old[i] if i < len(old) else None
    nj = new[j] if j < len(new) else None
    if oi == 1 and nj == 1:
      groups.append(([i], [j]))
      i += 1
      j += 1
      continue
    if oi == 1 or (nj is None and oi is not None):
      groups.append(([i], []))
      i += 1
      continue
    if nj == 1 or (oi is None and nj is not None):
      groups.append(([], [j]))
      j += 1
      continue
    gi, gj = [i], [j]
    po, pn = oi, nj
    i += 1
    j += 1
    while po != pn:
      if po < pn:
        po *= old[i]
        gi.append(i)
        i += 1
      else:
        pn *= new[j]
        gj.append(j)
        j += 1
    groups.append((gi, gj))
  return groups


def is_unit_broadcast(operand_shape, shape, broadcast_dimensions) -> bool:
  """True when ``broadcast_in_dim`` only inserts size-1 axes (a reshape in disguise)."""
  bd = list(broadcast_dimensions)
  if bd != sorted(bd):
    return False
  for i, d in enumerate(bd):
    if operand_shape[i] != shape[d]:
      return False
  return all(shape[d] == 1 for d in range(len(shape)) if d not in bd)


def provenance(labels) -> tuple[int, ...]:
  return tuple(sorted(prov(labels)))
