"""The per-example low-rank path of a bank: each example uses the adapter of its slot.

The base result is computed once for the whole batch by the interpreter; these
functions return only the low-rank term, for which each example (or token)
selects its slot. Three ways to select, all exact and differentiable (each
slot's factors receive only the gradient of the examples that used it):

* ``gather``: gather each example's ``A``/``B`` (``take`` along the slot axis),
  then batched matmuls: one adapter's FLOPs, plus moving ``ids × (in+out)·r``
  factor values. Per-token ids make that ``tokens × (in+out)·r``.
* ``onehot``: project every token with *every* slot's ``A`` (one matmul with
  ``slots·r`` columns), zero the other slots with a one-hot of the ids (times
  the slot's scale), then one matmul with all ``B``s: ``slots×`` the LoRA
  FLOPs, as two dense matmuls.
* ``ragged``: sort the tokens by slot and run ``jax.lax.ragged_dot`` twice
  (grouped matmuls), then unsort: one adapter's FLOPs where the backend has a
  grouped-matmul kernel. XLA:CPU lowers ``ragged_dot`` to a masked dense
  product over every group (``slots×`` the FLOPs and a ``slots×tokens×in``
  mask), so it only pays off on accelerators.

``"auto"`` uses ``gather`` when the ids are per row (each id covers a whole
sequence) or the bank is large, and ``onehot`` for per-token ids on banks of
at most ``ONEHOT_MAX_SLOTS`` slots (see ``choose`` and
``benchmarks/bank_strategies.py``).

**How ids meet a layer's input.** ``adapter_ids`` has the leading batch shape
of the model's inputs: ``(B,)`` (one adapter per row) or ``(B, T)`` (per
token). At every use of a bank kernel, the input's axes that are not
contracted with the kernel (its batch/sequence axes, in order) are matched
against the ids: either their first ``ids.ndim`` sizes equal ``ids.shape`` (the
ids are then broadcast over the remaining axes, e.g. the sequence of a
``(B, T, d)`` activation for ``(B,)`` ids), or the first axis has size
``ids.size`` (a layer that flattened batch and sequence, ids flattened
row-major). Anything else is an error naming the parameter and both shapes.
Embedding lookups match the ids against the looked-up indices' shape;
convolutions against the input's batch axis.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora._apply.consumers.contraction import lowrank_labels
from jlora._apply.consumers.gather import gather_term as lowrank_gather_term
from jlora._apply.consumers.layer_input import lora_input
from jlora._apply.consumers.plain import two_step
from jlora._apply.consumers.plans import DotPlan, factor_order
from jlora._apply.consumers.ragged import RaggedPlan, row_groups
from jlora._apply.context import ConsumerContext, fused_for
from jlora._apply.lowrank import RANK, Letters, LowRank, special_label
from jlora._errors import LoraApplyError, Unsupported

SLOT = special_label("slot")

# ``auto``: per-token ids use the one-hot path up to this many slots; beyond it the masked dense
# projections cost more than gathering each token's factors (benchmarks/bank_strategies.py).
ONEHOT_MAX_SLOTS = 32


def _ids(ctx: ConsumerContext, v: LowRank) -> jax.Array:
  ids = ctx.context.get("adapter_ids")
  slots = v.source.spec.variant.slots
  if ids is None:
    raise LoraApplyError(
        f"jlora.wrap: {v.path!r} is a bank of {slots} adapters (jlora.stack); call the wrapped function "
        "with adapter_ids=<int array of the inputs' batch shape, (B,) or (B, T); -1 = base only>.")
  concrete = None if isinstance(ids, jax.core.Tracer) else np.asarray(ids)
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise LoraApplyError(f"jlora.wrap: adapter_ids must be an integer array, got dtype {ids.dtype}.")
  if ids.ndim == 0:
    raise LoraApplyError("jlora.wrap: adapter_ids must have the inputs' batch shape, (B,) or (B, T); got a scalar.")
  if concrete is not None:
    lo, hi = int(concrete.min()), int(concrete.max())
    if lo < -1 or hi >= slots:
      raise LoraApplyError(
          f"jlora.wrap: adapter_ids hold values in [{lo}, {hi}], but the bank {v.path!r} has slots "
          f"0..{slots - 1} (and -1 = base only).")
  return ids.astype(jnp.int32)


def _map_ids(v: LowRank, ids: jax.Array, axes: list, what: str) -> tuple[jax.Array, tuple]:
  """Matches ``ids`` to the leading ``axes`` ``[(label, size), ...]`` of a layer input."""
  shape = tuple(ids.shape)
  sizes = tuple(s for _, s in axes)
  if sizes[:len(shape)] == shape:
    return ids, tuple(l for l, _ in axes[:len(shape)])
  if len(shape) > 1 and sizes and sizes[0] == math.prod(shape):
    return ids.reshape(-1), (axes[0][0],)
  raise LoraApplyError(
      f"jlora.wrap: {v.path!r} is a bank used on {what} whose batch axes have shape {sizes}, which "
      f"adapter_ids of shape {shape} do not fit: the ids must have the leading shape of the input's "
      "batch axes at every use of the bank (e.g. (B,) or (B, T) for (B, T, d) activations).")


def _mul(x, x_labels, w, w_labels):
  """``x * w`` broadcast by labels (``w_labels`` a subset of ``x_labels``)."""
  L = Letters()
  return jnp.einsum(f"{L(x_labels)},{L(w_labels)}->{L(x_labels)}", x, w.astype(x.dtype))


def _take(f, f_labels, idx, id_labels):
  """``f`` with its slot axis replaced by each example's slot."""
  k = f_labels.index(SLOT)
  return jnp.take(f, idx, axis=k), (*f_labels[:k], *id_labels, *f_labels[k + 1:])


def _slot_weights(v: LowRank, ids, id_labels):
  """One-hot of each example's slot times that slot's scale (zero for id -1)."""
  slots = v.source.spec.variant.slots
  scale, sl = v.factors["scales"], v.flabels["scales"]
  oh = jax.nn.one_hot(ids, slots, dtype=scale.dtype)  # id -1 is all zeros
  w_labels = (*[l for l in sl if l != SLOT], *id_labels, SLOT)
  L = Letters()
  return jnp.einsum(f"{L((*id_labels, SLOT))},{L(sl)}->{L(w_labels)}", oh, scale), w_labels


def _free_ids(traced, x_labels, free_labels):
  """Per-element ids of an input (``traced``) reduced to its free axes (index 0 along the others)."""
  x_labels = list(x_labels)
  for i in reversed(range(len(x_labels))):
    if x_labels[i] not in free_labels:
      traced = lax.index_in_dim(traced, 0, i, keepdims=False)
      del x_labels[i]
  return jnp.transpose(traced, [x_labels.index(l) for l in free_labels])


def choose(strategy: str, *, ids_size: int, tokens: int, slots: int, groupable: bool) -> str:
  """The selection strategy for one use (``"auto"`` resolved from the measured trade-offs)."""
  if strategy == "ragged" and not groupable:
    raise Unsupported("strategy='ragged' on a bank kernel with stacked axes the use does not slice "
                      "(use it under scan, or strategy='gather'/'onehot')")
  if strategy != "auto":
    return strategy
  per_token = ids_size == tokens
  return "onehot" if per_token and slots <= ONEHOT_MAX_SLOTS else "gather"


# -- matmul ---------------------------------------------------------------------------------


def dot_term(ctx: ConsumerContext, v: LowRank, x: jax.Array, plan: DotPlan, *, strategy: str) -> jax.Array:
  """The low-rank term of ``dot_general(x, bank kernel)``: each example with its slot."""
  ids = _ids(ctx, v)
  vset = set(v.labels)
  free = [(l, x.shape[i]) for i, l in enumerate(plan.x_labels) if l not in vset]
  try:
    ids, id_labels = _map_ids(v, ids, free, "an input")
  except LoraApplyError:
    # An input that flattened or sorted its batch (a mixture of experts): follow its rows back.
    traced = None if plan.rows is None or not free else plan.rows(ids)
    if traced is None:
      raise
    ids, id_labels = _free_ids(traced, plan.x_labels, [l for l, _ in free]), tuple(l for l, _ in free)
  xin = lora_input(ctx, v, x)
  spec = v.source.spec
  f1, l1, f2, l2 = factor_order(v, plan)
  tokens = math.prod(s for _, s in free)
  how = choose(strategy, ids_size=int(ids.size), tokens=tokens, slots=spec.variant.slots, groupable=not v.shared)
  idx = jnp.maximum(ids, 0)
  if how == "gather":
    f1s, l1s = _take(f1, l1, idx, id_labels)
    f2s, l2s = _take(f2, l2, idx, id_labels)
    sc, scl = _take(v.factors["scales"], v.flabels["scales"], idx, id_labels)
    sc = _mul(sc, scl, (ids >= 0).astype(sc.dtype), id_labels)
    f1s = _mul(f1s, l1s, sc, scl)
    labels = lowrank_labels(plan.x_labels, l1s, l2s, plan.out_labels)
    y = two_step(xin, f1s, f2s, labels=labels, scale=1.0, precision=plan.precision, fused=fused_for(ctx, spec.rank))
  elif how == "onehot":
    w, wl = _slot_weights(v, ids, id_labels)
    xl, l1, l2, tl, ol = lowrank_labels(plan.x_labels, l1, l2, plan.out_labels)
    L = Letters()
    t = jnp.einsum(f"{L(xl)},{L(l1)}->{L(tl)}", xin, f1, precision=plan.precision)
    t = _mul(t, tl, w, wl)
    y = jnp.einsum(f"{L(tl)},{L(l2)}->{L(ol)}", t, f2, precision=plan.precision)
  else:
    y = _ragged(v, xin, plan, ids, id_labels, free, f1, l1, f2, l2)
  return y.astype(plan.out_dtype)


def _ragged(v, xin, plan, ids, id_labels, free, f1, l1, f2, l2):
  slots, rank = v.source.spec.variant.slots, v.source.spec.rank
  k_labels = [l for l in l1 if l not in (SLOT, RANK)]
  n_labels = [l for l in l2 if l not in (SLOT, RANK)]
  free_labels = [l for l, _ in free]
  free_shape = [s for _, s in free]
  L = Letters()
  xm = jnp.einsum(f"{L(plan.x_labels)}->{L(free_labels + k_labels)}", xin).reshape(math.prod(free_shape), -1)
  # each token's id: the ids cover the leading free axes; broadcast them over the rest
  tok = jnp.broadcast_to(ids.reshape(ids.shape + (1,) * (len(free_shape) - ids.ndim)), free_shape).reshape(-1)
  key = jnp.where(tok >= 0, tok, slots)  # base-only tokens go last, outside every group
  order = jnp.argsort(key, stable=True)
  sizes = jnp.bincount(key, length=slots + 1)[:slots].astype(jnp.int32)
  scale = v.factors["scales"]
  tok_scale = jnp.where(tok >= 0, scale[jnp.maximum(tok, 0)], 0).astype(xm.dtype)
  f1m = jnp.einsum(f"{L(l1)}->{L([SLOT, *k_labels, RANK])}", f1).reshape(slots, -1, rank)
  f2m = jnp.einsum(f"{L(l2)}->{L([SLOT, RANK, *n_labels])}", f2).reshape(slots, rank, -1)
  xs = xm[order]
  t = lax.ragged_dot(xs, f1m, sizes, precision=plan.precision) * tok_scale[order][:, None]
  ys = lax.ragged_dot(t.astype(f2m.dtype), f2m, sizes, precision=plan.precision)
  y = jnp.zeros_like(ys).at[order].set(ys)
  n_shape = [f2.shape[l2.index(l)] for l in n_labels]
  y = y.reshape(*free_shape, *n_shape)
  return jnp.einsum(f"{L(free_labels + n_labels)}->{L(plan.out_labels)}", y)


# -- grouped matmul (routed experts) ------------------------------------------------------------


def ragged_term(ctx: ConsumerContext, v: LowRank, x: jax.Array, group_sizes: jax.Array, plan: RaggedPlan, *,
                strategy: str) -> jax.Array:
  """The low-rank term of ``ragged_dot(x_sorted, bank kernel, group_sizes)``: each row with its expert's
  factors in its example's slot.

  The sorted rows' ids come from ``plan.rows`` (the ids followed through the model's own sort).
  ``onehot`` (``auto`` up to ``ONEHOT_MAX_SLOTS`` slots): two grouped matmuls with the experts'
  ``slots·r`` columns, the other slots masked per row; ``gather``: each row's ``A``/``B`` gathered
  by (expert, slot); ``ragged``: rows re-sorted by (expert, slot), two grouped matmuls over
  ``experts·slots`` groups.
  """
  spec = v.source.spec
  slots, rank = spec.variant.slots, spec.rank
  ids = _ids(ctx, v)
  traced = None if plan.rows is None else plan.rows(ids)
  if traced is None:
    raise LoraApplyError(
        f"jlora.wrap: {v.path!r} is a bank of expert adapters used by a ragged_dot whose input rows cannot be "
        f"followed back to the batch that adapter_ids {tuple(ids.shape)} label (only gathers, reshapes, slices, "
        "casts and elementwise operations may lie between them); serve the adapters one at a time.")
  k_labels = [l for l in v.a_labels if l not in (plan.group, SLOT, RANK)]
  n_labels = [l for l in v.b_labels if l not in (plan.group, SLOT, RANK)]
  if sorted(map(id, plan.x_labels)) != sorted(map(id, [plan.ragged, *k_labels])):
    raise Unsupported("a bank on a ragged_dot with batch dimensions or several free input axes")
  L = Letters()
  m = x.shape[plan.x_labels.index(plan.ragged)]
  xin = lora_input(ctx, v, x)
  x2 = jnp.einsum(f"{L(plan.x_labels)}->{L([plan.ragged, *k_labels])}", xin).reshape(m, -1)
  a2 = jnp.einsum(f"{L(v.a_labels)}->{L([plan.group, SLOT, *k_labels, RANK])}", v.a)
  b2 = jnp.einsum(f"{L(v.b_labels)}->{L([plan.group, SLOT, RANK, *n_labels])}", v.b)
  experts = a2.shape[0]
  a2, b2 = a2.reshape(experts, slots, -1, rank), b2.reshape(experts, slots, rank, -1)
  scales = jnp.einsum(f"{L(v.flabels['scales'])}->{L([plan.group, SLOT])}", v.factors["scales"])
  row_ids = jnp.moveaxis(traced, plan.x_labels.index(plan.ragged), 0).reshape(m, -1)[:, 0]
  groups = row_groups(group_sizes, m)
  valid = (groups < experts) & (row_ids >= 0)
  g, sl = jnp.minimum(groups, experts - 1), jnp.maximum(row_ids, 0)
  sc = jnp.where(valid, scales[g, sl], 0).astype(x2.dtype)
  how = strategy if strategy in ("gather", "onehot", "ragged") else ("onehot" if slots <= ONEHOT_MAX_SLOTS else "gather")
  prec = plan.precision
  if how == "onehot":
    a_cols = jnp.transpose(a2, (0, 2, 1, 3)).reshape(experts, a2.shape[2], slots * rank)
    t = lax.ragged_dot(x2, a_cols, group_sizes, precision=prec).reshape(m, slots, rank)
    w = jax.nn.one_hot(sl, slots, dtype=t.dtype) * sc[:, None]
    t = (t * w[:, :, None]).reshape(m, slots * rank)
    y = lax.ragged_dot(t, b2.reshape(experts, slots * rank, -1), group_sizes, precision=prec)
  elif how == "gather":
    t = jnp.einsum("mk,mkr->mr", x2, a2[g, sl], precision=prec) * sc[:, None]
    y = jnp.einsum("mr,mrn->mn", t, b2[g, sl], precision=prec)
  else:
    key = jnp.where(valid, g * slots + sl, experts * slots)
    order = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=experts * slots + 1)[:experts * slots].astype(group_sizes.dtype)
    t = lax.ragged_dot(x2[order], a2.reshape(experts * slots, -1, rank), sizes, precision=prec)
    t = t * sc[order][:, None]
    ys = lax.ragged_dot(t, b2.reshape(experts * slots, rank, -1), sizes, precision=prec)
    y = jnp.zeros_like(ys).at[order].set(ys)
  n_shape = [v.b.shape[v.b_labels.index(l)] for l in n_labels]
  y = y.reshape(m, *n_shape)
  return jnp.einsum(f"{L([plan.ragged, *n_labels])}->{L(plan.out_labels)}", y).astype(plan.out_dtype)


# -- lookup and convolution -------------------------------------------------------------------


def gather_term(ctx: ConsumerContext, v: LowRank, indices: jax.Array, params: dict, *, out_dtype: Any) -> jax.Array:
  """Low-rank part of an embedding lookup from a bank: every slot's rows, weighted by the ids' one-hot."""
  ids = _ids(ctx, v)

  def rows(fg, fg_labels, idx_labels):
    axes = [(l, fg.shape[fg_labels.index(l)]) for l in idx_labels]
    mapped, id_labels = _map_ids(v, ids, axes, "a lookup")
    w, wl = _slot_weights(v, mapped, id_labels)
    return _mul(fg, fg_labels, w, wl)

  return lowrank_gather_term(v, indices, params=params, out_dtype=out_dtype, rows=rows)


def conv_term(ctx: ConsumerContext, v: LowRank, x: jax.Array, params: dict, *, out_dtype: Any) -> jax.Array:
  """Low-rank part of a convolution: a conv to ``slots·r`` channels masked per example, then ``B``."""
  if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
    raise Unsupported("grouped convolutions (feature_group_count/batch_group_count > 1)")
  ids = _ids(ctx, v)
  dn = params["dimension_numbers"]
  out_label = v.labels[dn.rhs_spec[0]]
  al, bl = v.flabels["a"], v.flabels["b"]
  if v.shared or set(bl) != {SLOT, RANK, out_label} or out_label in al:
    raise Unsupported("a convolution whose output-feature axis is not B's only kernel axis")
  spec = v.source.spec
  slots, rank = spec.variant.slots, spec.rank
  ids, _ = _map_ids(v, ids, [(None, x.shape[dn.lhs_spec[0]])], "a convolution input")
  # A as a conv kernel whose output-feature axis is (slot, rank) flattened.
  order = [l for l in v.labels if l != out_label]
  L = Letters()
  a_view = jnp.einsum(f"{L(al)}->{L([*order, SLOT, RANK])}", v.a).reshape(
      *[v.a.shape[al.index(l)] for l in order], slots * rank)
  a_view = jnp.moveaxis(a_view, -1, dn.rhs_spec[0])
  xin = lora_input(ctx, v, x)
  conv_params = dict(params, preferred_element_type=None)
  t = lax.conv_general_dilated_p.bind(xin, a_view, **conv_params)
  c, n = dn.out_spec[1], dn.out_spec[0]
  t = jnp.moveaxis(t, (n, c), (0, -1))  # (N, *spatial, slots·rank)
  t = t.reshape(*t.shape[:-1], slots, rank)
  w = jax.nn.one_hot(ids, slots, dtype=t.dtype) * v.factors["scales"].astype(t.dtype)  # (N, slots)
  t = t * w.reshape(w.shape[0], *([1] * (t.ndim - 3)), slots, 1)
  b = jnp.einsum(f"{L(bl)}->{L([SLOT, RANK, out_label])}", v.b)
  y = jnp.einsum("...sr,sro->...o", t, b, precision=params.get("precision"))
  y = jnp.moveaxis(y, (0, -1), (n, c))
  return y.astype(out_dtype)

