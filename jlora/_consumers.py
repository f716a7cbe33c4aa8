"""The low-rank path where a LoRA kernel is consumed: matmul, convolution, lookup.

Each function returns the *scaled low-rank term* to add to the base result,
computed from the layer input and the factors only (``x·A`` first, then
``·B``); the dense ``W0 + scale·B·A`` is never formed.

The rank-``r`` expansion ``t·B`` (and ``dt·Aᵀ`` in the backward pass) can be
emitted as ``r`` fused multiply-adds instead of a skinny matmul
(``fused_expansion``). XLA's CPU backend does not fuse a matmul into the
following add, so with plain matmuls the base output and the LoRA term live as
two full-size buffers; the fused form lets XLA add the term inside the
consumer's loop. On the benchmark Llama this cuts the LoRA step's temp memory
below full fine-tuning's and its time by ~25% (see ``benchmarks/``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jlora._lowrank import RANK, Label, Letters, LowRank, Unsupported, new_label, prov

# Ranks up to this use the fused expansion when it is enabled.
FUSED_EXPANSION_MAX_RANK = 16


class OrientationError(Exception):
  pass


def _dropout(x, rate: float, key):
  if key is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


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
  got = tuple(sorted(prov(c)))
  raise OrientationError(
      f"{v.path!r} is {what} over kernel axes {got}, but its adapter was created with input "
      f"axes {spec.in_axes} (A covers the input axes, B the output axes {spec.out_axes}). The "
      "layer uses this kernel in another orientation (e.g. stored transposed like GPT-2's "
      "Conv1D). Re-create the adapters with jlora.init(..., layout=jlora.infer_layout(apply_fn, "
      "params, *example_args)) or give the rule layout=jlora.KernelLayout(in_axes=...)."
  )


# -- the two-step contraction ------------------------------------------------------------


def _expand(t, t_labels, f, f_labels, out_labels, fused: bool, precision=None):
  """``einsum(t, f -> out)`` where only the rank label is contracted."""
  L = Letters()
  if not fused:
    return jnp.einsum(f"{L(t_labels)},{L(f_labels)}->{L(out_labels)}", t, f, precision=precision)
  r_t, r_f = t_labels.index(RANK), f_labels.index(RANK)
  tl = [l for l in t_labels if l != RANK]
  fl = [l for l in f_labels if l != RANK]
  spec = f"{L(tl)},{L(fl)}->{L(out_labels)}"
  acc = None
  for k in range(t.shape[r_t]):
    term = jnp.einsum(spec, lax.index_in_dim(t, k, r_t, keepdims=False),
                      lax.index_in_dim(f, k, r_f, keepdims=False))
    acc = term if acc is None else acc + term
  return acc


def _lowrank_term(x, f1, f2, *, scale, labels, precision, fused):
  """``scale · einsum(einsum(x, f1), f2)`` with labels ``(x, f1, f2, t, out)``."""
  xl, l1, l2, tl, ol = labels
  L = Letters()
  t = jnp.einsum(f"{L(xl)},{L(l1)}->{L(tl)}", x, f1, precision=precision)
  t = t * jnp.asarray(scale, t.dtype)
  return _expand(t, tl, f2, l2, ol, fused, precision), t


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused_lowrank_term(x, f1, f2, scale, labels, precision):
  return _lowrank_term(x, f1, f2, scale=scale, labels=labels, precision=precision, fused=True)[0]


def _fused_fwd(x, f1, f2, scale, labels, precision):
  y, t = _lowrank_term(x, f1, f2, scale=scale, labels=labels, precision=precision, fused=True)
  return y, (x, f1, f2, t)


def _fused_bwd(scale, labels, precision, res, dy):
  # Same residuals and contractions as autodiff of the unfused form; only the
  # expansion dt·f1ᵀ is emitted fused so that XLA adds it into the base dx.
  x, f1, f2, t = res
  xl, l1, l2, tl, ol = labels
  L = Letters()
  dy = dy.astype(f2.dtype)
  dt = jnp.einsum(f"{L(ol)},{L(l2)}->{L(tl)}", dy, f2, precision=precision)
  df2 = jnp.einsum(f"{L(tl)},{L(ol)}->{L(l2)}", t, dy, precision=precision)
  dt = dt * jnp.asarray(scale, dt.dtype)
  dx = _expand(dt, tl, f1, l1, xl, True).astype(x.dtype)
  df1 = jnp.einsum(f"{L(xl)},{L(tl)}->{L(l1)}", x, dt, precision=precision)
  return dx, df1, df2


_fused_lowrank_term.defvjp(_fused_fwd, _fused_bwd)


@dataclasses.dataclass(frozen=True)
class DotPlan:
  """How a ``dot_general`` consumes a LoRA kernel, in labels (see ``dot_plan``)."""

  v_is_lhs: bool
  x_labels: tuple  # labels of the layer input's axes (contracted/batch ones shared with the kernel)
  out_labels: tuple  # labels of the result's axes
  first: str  # the factor the input meets first: "a" (or "b" for a tied embedding used as output)
  precision: Any
  out_dtype: Any


def dot_plan(v: LowRank, x, *, v_is_lhs: bool, dimension_numbers, precision, out_dtype) -> DotPlan:
  """Labels the input and the result of ``dot_general(x, v)`` (or ``(v, x)``)."""
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
  first = _orientation(v, frozenset(v.labels[i] for i in vc), "contracted")
  return DotPlan(v_is_lhs, tuple(x_labels), tuple(out_labels), first, precision, out_dtype)


def lowrank_labels(x_labels, l1, l2, out_labels) -> tuple:
  """``(x, f1, f2, t, out)`` labels of the two-step contraction ``(x·f1)·f2``."""
  keep = set(out_labels) | set(l2)
  t_labels: list[Label] = []
  for l in list(x_labels) + list(l1):
    if l in keep and l not in t_labels:
      t_labels.append(l)
  return tuple(x_labels), tuple(l1), tuple(l2), tuple(t_labels), tuple(out_labels)


def two_step(x, f1, f2, *, labels, scale, precision, fused: bool):
  """``scale · ((x·f1)·f2)`` with ``labels`` from ``lowrank_labels``; fused expansion if asked."""
  if fused:
    return _fused_lowrank_term(x, f1, f2, scale, labels, precision)
  return _lowrank_term(x, f1, f2, scale=scale, labels=labels, precision=precision, fused=False)[0]


def lora_input(ctx, v: LowRank, x):
  """The layer input as the low-rank path sees it: LoRA dropout (training only), factor dtype."""
  spec = v.source.spec
  return _dropout(x, spec.dropout, ctx.next_key()).astype(v.a.dtype)


def lora_dot_term(ctx, v: LowRank, x, plan: DotPlan, *, scale, factors=None):
  """The scaled low-rank term of a ``dot_general`` for factors ``a`` and ``b``.

  ``factors`` optionally replaces ``(a, b)`` (same labels), e.g. a variant's
  effective factors.
  """
  a, b = factors if factors is not None else (v.a, v.b)
  xin = lora_input(ctx, v, x)
  if plan.first == "a":
    f1, l1, f2, l2 = a, v.a_labels, b, v.b_labels
  else:
    f1, l1, f2, l2 = b, v.b_labels, a, v.a_labels
  labels = lowrank_labels(plan.x_labels, l1, l2, plan.out_labels)
  fused = ctx.fused_expansion and v.source.spec.rank <= FUSED_EXPANSION_MAX_RANK
  y = two_step(xin, f1, f2, labels=labels, scale=scale, precision=plan.precision, fused=fused)
  return y.astype(plan.out_dtype)


# -- convolution and lookup --------------------------------------------------------------


def conv(v: LowRank, x, *, params: dict, out_dtype, key):
  """Low-rank part of a convolution: a conv to ``rank`` channels, then a 1x1 projection."""
  if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
    raise Unsupported("grouped convolutions (feature_group_count/batch_group_count > 1)")
  dn = params["dimension_numbers"]
  rhs_spec, out_spec = dn.rhs_spec, dn.out_spec
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


def gather(v: LowRank, indices, *, params: dict, out_dtype, rows=None):
  """Low-rank part of an embedding lookup: gather rows of one factor, then project.

  ``rows(fg, fg_labels, idx_labels) -> fg`` optionally replaces the scaling of
  the gathered rows ``fg`` (labels: the indices' batch axes ``idx_labels``, then
  the factor's remaining axes), e.g. a bank's per-example slot weights.
  """
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
        f"{v.path!r} is looked up (gathered) along kernel axes {tuple(sorted(prov(c)))}, but "
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
  L = Letters()
  fg = fg * jnp.asarray(spec.scale, fg.dtype) if rows is None else rows(fg, tuple(fg_labels), tuple(idx_labels))
  y = jnp.einsum(f"{L(fg_labels)},{L(gl)}->{L(out_labels)}", fg, g)
  return y.astype(out_dtype)
