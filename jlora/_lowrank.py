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

from jlora._weight import LoraSpec, LoraWeight, describe_leaf

_uid = itertools.count()


@dataclasses.dataclass(frozen=True)
class Label:
  uid: int
  axes: frozenset  # original kernel axes this value axis derives from


RANK = Label(-1, frozenset())


def new_label(axes: frozenset = frozenset()) -> Label:
  return Label(next(_uid), frozenset(axes))


@dataclasses.dataclass(frozen=True)
class Source:
  """Which LoRA kernel a value comes from."""

  path: str
  spec: LoraSpec | None  # None in probe mode
  index: int


class Unsupported(Exception):
  """Raised by a rule when the low-rank form cannot express an operation."""


def prov(labels) -> frozenset:
  out = frozenset()
  for l in labels:
    out |= l.axes
  return out


@jax.tree_util.register_pytree_node_class
class LowRank:
  __slots__ = ("base", "a", "b", "labels", "a_labels", "b_labels", "source", "dropped")

  def __init__(self, base, a, b, labels, a_labels, b_labels, source, dropped=frozenset()):
    self.base = base
    self.a = a
    self.b = b
    self.labels = tuple(labels)
    self.a_labels = None if a_labels is None else tuple(a_labels)
    self.b_labels = None if b_labels is None else tuple(b_labels)
    self.source = source
    self.dropped = frozenset(dropped)

  # -- pytree ------------------------------------------------------------------
  def tree_flatten(self):
    aux = (self.labels, self.a_labels, self.b_labels, self.source, self.dropped)
    return (self.base, self.a, self.b), aux

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  def __repr__(self) -> str:
    return (f"LowRank(base={describe_leaf(self.base)}, a={describe_leaf(self.a)}, b={describe_leaf(self.b)}, "
            f"path={getattr(self.source, 'path', self.source)!r})")

  # -- construction ------------------------------------------------------------
  @classmethod
  def from_weight(cls, w: LoraWeight, base: Any, source: Source) -> "LowRank":
    spec = w.spec
    labels = [new_label(frozenset({i})) for i in range(len(spec.shape))]
    a_labels = [labels[i] for i in spec.batch_axes + spec.in_axes] + [RANK]
    b_labels = [labels[i] for i in spec.batch_axes] + [RANK] + [labels[i] for i in spec.out_axes]
    return cls(base, w.a, w.b, labels, a_labels, b_labels, source)

  @classmethod
  def probe(cls, base: Any, source: Source) -> "LowRank":
    labels = [new_label(frozenset({i})) for i in range(base.ndim)]
    return cls(base, None, None, labels, None, None, source)

  @property
  def is_probe(self) -> bool:
    return self.a is None

  @property
  def path(self) -> str:
    return self.source.path

  def _new(self, base, a=None, b=None, labels=None, a_labels=None, b_labels=None, dropped=None):
    return LowRank(
        base,
        self.a if a is None else a,
        self.b if b is None else b,
        self.labels if labels is None else labels,
        self.a_labels if a_labels is None else a_labels,
        self.b_labels if b_labels is None else b_labels,
        self.source,
        self.dropped if dropped is None else dropped,
    )

  # -- label sets ---------------------------------------------------------------
  @property
  def shared(self) -> frozenset:
    return frozenset(self.a_labels) & frozenset(self.b_labels) - {RANK}

  @property
  def a_only(self) -> frozenset:
    return frozenset(self.a_labels) - frozenset(self.b_labels)

  @property
  def b_only(self) -> frozenset:
    return frozenset(self.b_labels) - frozenset(self.a_labels)

  def owner(self, label: Label) -> str:
    in_a, in_b = label in self.a_labels, label in self.b_labels
    return "both" if in_a and in_b else ("a" if in_a else "b")

  # -- structural ops -------------------------------------------------------------
  def with_base(self, base) -> "LowRank":
    return self._new(base)

  def transpose(self, perm: Sequence[int], base) -> "LowRank":
    return self._new(base, labels=[self.labels[p] for p in perm])

  def _canonical(self, f, f_labels):
    """Factor transposed to (value labels in value order..., RANK)."""
    order = [l for l in self.labels if l in f_labels] + [RANK]
    perm = [f_labels.index(l) for l in order]
    return jnp.transpose(f, perm), order

  def reshape(self, new_shape: Sequence[int], base) -> "LowRank":
    old_shape = tuple(self.base.shape)
    new_shape = tuple(new_shape)
    groups = _reshape_groups(old_shape, new_shape)
    new_labels: list[Label] = [RANK] * len(new_shape)
    owners: list[str] = []
    for gi, gj in groups:
      old = [self.labels[i] for i in gi]
      nonunit = [l for i, l in zip(gi, old) if old_shape[i] != 1]
      new_nonunit = [j for j in gj if new_shape[j] != 1]
      if self.is_probe:
        owner = "a"
      else:
        own = {self.owner(l) for l in nonunit}
        if len(own) > 1:
          raise Unsupported("a reshape merges input-side and output-side kernel axes into one axis")
        owner = own.pop() if own else "a"
      keep = len(nonunit) == 1 and len(new_nonunit) == 1 and (
          old_shape[self.labels.index(nonunit[0])] == new_shape[new_nonunit[0]])
      if owner == "both" and not keep:
        raise Unsupported("a reshape merges or splits a stacked (batch) axis")
      for j in gj:
        if keep and j == new_nonunit[0]:
          new_labels[j] = nonunit[0]
        elif new_shape[j] == 1:
          new_labels[j] = new_label()
        else:
          new_labels[j] = new_label(prov(nonunit))
      owners.append(owner)
    carried = prov(new_labels)
    dropped = self.dropped | frozenset(
        ax for l in self.labels if l not in new_labels for ax in l.axes if ax not in carried)
    if self.is_probe:
      return self._new(base, labels=new_labels, dropped=dropped)

    def factor(f, f_labels, name):
      f_c, _ = self._canonical(f, f_labels)
      shape, labels = [], []
      for (_, gj), owner in zip(groups, owners):
        if owner in (name, "both"):
          for j in gj:
            shape.append(new_shape[j])
            labels.append(new_labels[j])
      return jnp.reshape(f_c, (*shape, f_c.shape[-1])), labels + [RANK]

    a, a_labels = factor(self.a, self.a_labels, "a")
    b, b_labels = factor(self.b, self.b_labels, "b")
    return LowRank(base, a, b, new_labels, a_labels, b_labels, self.source, dropped)

  def slice_axes(self, axis_slices: dict[int, tuple], base, dynamic: bool) -> "LowRank":
    """Slices value axes; ``axis_slices[axis] = (start, size, stride)``."""
    a, b = self.a, self.b
    if not self.is_probe:
      for axis, (start, size, stride) in axis_slices.items():
        label = self.labels[axis]
        for which in ("a", "b"):
          f_labels = self.a_labels if which == "a" else self.b_labels
          if label not in f_labels:
            continue
          f = a if which == "a" else b
          k = f_labels.index(label)
          if dynamic:
            f = lax.dynamic_slice_in_dim(f, start, size, axis=k)
          else:
            f = lax.slice_in_dim(f, start, start + (size - 1) * stride + 1, stride, axis=k)
          if which == "a":
            a = f
          else:
            b = f
    return self._new(base, a=a, b=b)

  def scale_by(self, c, base) -> "LowRank":
    if self.is_probe:
      return self._new(base)
    return self._new(base, a=self.a * jnp.asarray(c, self.a.dtype))

  def map_factors(self, fn, base) -> "LowRank":
    if self.is_probe:
      return self._new(base)
    return self._new(base, a=fn(self.a), b=fn(self.b))

  # -- scan support ------------------------------------------------------------------
  def scan_split(self):
    """Children with the first value axis moved to the front, and a rebuild fn for slices."""
    label = self.labels[0]
    if self.is_probe:
      rest = self.labels[1:]
      dropped = self.dropped | label.axes

      def rebuild(children):
        return LowRank(children[0], None, None, rest, None, None, self.source, dropped)

      return (self.base, None, None), rebuild
    if self.owner(label) != "both":
      raise Unsupported(
          "lax.scan slices this kernel along an axis that is not a stacked (batch) axis of the "
          "adapter; give the kernel a layout with batch_axes=(0,)"
      )
    ka, kb = self.a_labels.index(label), self.b_labels.index(label)
    a = jnp.moveaxis(self.a, ka, 0)
    b = jnp.moveaxis(self.b, kb, 0)
    rest = self.labels[1:]
    a_rest = tuple(l for l in self.a_labels if l != label)
    b_rest = tuple(l for l in self.b_labels if l != label)

    def rebuild(children):
      return LowRank(children[0], children[1], children[2], rest, a_rest, b_rest, self.source, self.dropped)

    return (self.base, a, b), rebuild

  # -- dense fallback -------------------------------------------------------------------
  def dense(self) -> jax.Array:
    """``base + scale·(a⊗b)`` computed in float32 and cast to ``base.dtype`` (opt-in only)."""
    letters = Letters()
    spec = f"{letters(self.a_labels)},{letters(self.b_labels)}->{letters(self.labels)}"
    d = jnp.einsum(spec, self.a.astype(jnp.float32), self.b.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)
    out = self.base.astype(jnp.float32) + self.source.spec.scale * d
    return out.astype(self.base.dtype)


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



