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

from jlora._weight import LoraSpec, LoraWeight

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


def _prov(labels) -> frozenset:
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
          new_labels[j] = new_label(_prov(nonunit))
      owners.append(owner)
    carried = _prov(new_labels)
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
    letters = _Letters()
    spec = f"{letters(self.a_labels)},{letters(self.b_labels)}->{letters(self.labels)}"
    d = jnp.einsum(spec, self.a.astype(jnp.float32), self.b.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)
    out = self.base.astype(jnp.float32) + self.source.spec.scale * d
    return out.astype(self.base.dtype)


class _Letters:
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


# -----------------------------------------------------------------------------
# Consumers: the low-rank path of a matmul, a convolution and a lookup.
# -----------------------------------------------------------------------------


def _dropout(x, rate: float, key):
  if key is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class OrientationError(Exception):
  pass


def _orientation(v: LowRank, contracted: frozenset, what: str) -> str:
  """Which factor the layer input meets first; raises if the use is transposed."""
  c = frozenset(l for l in contracted if l.axes)
  a_only = frozenset(l for l in v.a_only if l.axes)
  b_only = frozenset(l for l in v.b_only if l.axes)
  if c and c == a_only:
    return "a"
  spec = v.source.spec
  if c and c == b_only and spec.layout.embedding:
    return "b"
  got = tuple(sorted(_prov(c)))
  raise OrientationError(
      f"{v.path!r} is {what} over kernel axes {got}, but its adapter was created with input "
      f"axes {spec.in_axes} (A covers the input axes, B the output axes {spec.out_axes}). The "
      "layer uses this kernel in another orientation (e.g. stored transposed like GPT-2's "
      "Conv1D). Re-create the adapters with jlora.init(..., layout=jlora.infer_layout(apply_fn, "
      "params, *example_args)) or give the rule layout=jlora.KernelLayout(in_axes=...)."
  )


def dot_general(v: LowRank, x, *, v_is_lhs: bool, dimension_numbers, precision, out_dtype, key):
  """The low-rank part of ``dot_general(x, v)`` (or ``(v, x)``), already scaled."""
  (lc, rc), (lb, rb) = dimension_numbers
  if v_is_lhs:
    vc, xc, vb, xb = lc, rc, lb, rb
  else:
    xc, vc, xb, vb = lc, rc, lb, rb
  x_labels: list[Label] = [new_label() for _ in range(x.ndim)]
  for xi, vi in zip(xc, vc):
    x_labels[xi] = v.labels[vi]
  for xi, vi in zip(xb, vb):
    x_labels[xi] = v.labels[vi]
  batch = [v.labels[i] for i in vb]
  x_free = [x_labels[i] for i in range(x.ndim) if i not in xc and i not in xb]
  v_free = [v.labels[i] for i in range(len(v.labels)) if i not in vc and i not in vb]
  out_labels = batch + (v_free + x_free if v_is_lhs else x_free + v_free)
  contracted = frozenset(v.labels[i] for i in vc)
  first = _orientation(v, contracted, "contracted")
  spec = v.source.spec
  xin = _dropout(x, spec.dropout, key).astype(v.a.dtype)
  if first == "a":
    f1, l1, f2, l2 = v.a, v.a_labels, v.b, v.b_labels
  else:
    f1, l1, f2, l2 = v.b, v.b_labels, v.a, v.a_labels
  keep = set(out_labels) | set(l2)
  t_labels = []
  for l in list(x_labels) + list(l1):
    if l in keep and l not in t_labels:
      t_labels.append(l)
  L = _Letters()
  t = jnp.einsum(f"{L(x_labels)},{L(l1)}->{L(t_labels)}", xin, f1, precision=precision)
  t = t * jnp.asarray(spec.scale, t.dtype)
  y = jnp.einsum(f"{L(t_labels)},{L(l2)}->{L(out_labels)}", t, f2, precision=precision)
  return y.astype(out_dtype)


def conv(v: LowRank, x, *, params: dict, out_dtype, key):
  """Low-rank part of a convolution: a conv to ``rank`` channels, then a 1x1 projection."""
  if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
    raise Unsupported("grouped convolutions (feature_group_count/batch_group_count > 1)")
  dn = params["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  out_label = v.labels[rhs_spec[0]]
  contracted = frozenset(l for i, l in enumerate(v.labels) if i != rhs_spec[0])
  first = _orientation(v, contracted, "convolved")
  if first != "a" or v.shared or set(v.b_labels) != {RANK, out_label}:
    raise Unsupported("a convolution whose output-feature axis is not B's only axis")
  spec = v.source.spec
  perm = [v.a_labels.index(RANK if l == out_label else l) for l in v.labels]
  a_view = jnp.transpose(v.a, perm)
  xin = _dropout(x, spec.dropout, key).astype(v.a.dtype)
  conv_params = dict(params)
  conv_params["preferred_element_type"] = None
  t = lax.conv_general_dilated_p.bind(xin, a_view, **conv_params)
  c = out_spec[1]
  t = t * jnp.asarray(spec.scale, t.dtype)
  b = jnp.transpose(v.b, [v.b_labels.index(RANK), v.b_labels.index(out_label)])
  y = jnp.moveaxis(jnp.tensordot(t, b, axes=[[c], [0]], precision=params.get("precision")), -1, c)
  return y.astype(out_dtype)


def gather(v: LowRank, indices, *, params: dict, out_dtype):
  """Low-rank part of an embedding lookup: gather rows of one factor, then project."""
  dn = params["dimension_numbers"]
  if dn.operand_batching_dims or dn.start_indices_batching_dims:
    raise Unsupported("a batched gather")
  slice_sizes = params["slice_sizes"]
  shape = tuple(v.base.shape)
  indexed = [v.labels[d] for d in dn.start_index_map]
  if not set(dn.collapsed_slice_dims) <= set(dn.start_index_map):
    raise Unsupported("a gather collapsing an axis it does not index")
  for d in range(len(shape)):
    if d not in dn.start_index_map and slice_sizes[d] != shape[d]:
      raise Unsupported("a gather taking a partial slice of a non-indexed axis")
  spec = v.source.spec
  c = frozenset(l for l in indexed if l.axes)
  a_only = frozenset(l for l in v.a_only if l.axes)
  b_only = frozenset(l for l in v.b_only if l.axes)
  if c and c <= a_only:
    f, fl, g, gl = v.a, v.a_labels, v.b, v.b_labels
  elif c and c <= b_only and spec.layout.embedding:
    f, fl, g, gl = v.b, v.b_labels, v.a, v.a_labels
  else:
    raise OrientationError(
        f"{v.path!r} is looked up (gathered) along kernel axes {tuple(sorted(_prov(c)))}, but "
        f"its adapter's input axes are {spec.in_axes}. Give the rule "
        "layout=jlora.KernelLayout(in_axes=<the looked-up axes>, embedding=True) or use "
        "jlora.infer_layout."
    )
  collapsed = [v.labels[d] for d in dn.collapsed_slice_dims]
  nb = indices.ndim - 1
  kept = [l for l in fl if l not in collapsed]
  new_dn = lax.GatherDimensionNumbers(
      offset_dims=tuple(range(nb, nb + len(kept))),
      collapsed_slice_dims=tuple(sorted(fl.index(l) for l in collapsed)),
      start_index_map=tuple(fl.index(l) for l in indexed),
  )
  sizes = tuple(
      slice_sizes[v.labels.index(l)] if l in indexed else f.shape[k] for k, l in enumerate(fl)
  )
  fg = lax.gather(f, indices, new_dn, sizes, indices_are_sorted=params["indices_are_sorted"],
                  unique_indices=params["unique_indices"], mode=params["mode"],
                  fill_value=params["fill_value"])
  idx_labels = [new_label() for _ in range(nb)]
  fg_labels = idx_labels + kept
  # Output layout of the original gather: offset dims carry the non-collapsed value axes.
  v_kept = [l for l in v.labels if l not in collapsed]
  out_labels: list[Label] = []
  it_idx, it_off = iter(idx_labels), iter(v_kept)
  for d in range(nb + len(v_kept)):
    out_labels.append(next(it_off) if d in dn.offset_dims else next(it_idx))
  L = _Letters()
  fg = fg * jnp.asarray(spec.scale, fg.dtype)
  y = jnp.einsum(f"{L(fg_labels)},{L(gl)}->{L(out_labels)}", fg, g)
  return y.astype(out_dtype)


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
  return tuple(sorted(_prov(labels)))


