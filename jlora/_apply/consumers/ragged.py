"""Expert LoRA: the low-rank term of ``jax.lax.ragged_dot`` (grouped matmuls of a mixture of experts).

A sorted-dispatch MoE (MaxText's, tunix's, a user's own) sorts its token rows by
expert and calls ``ragged_dot(x_sorted, W, group_sizes)`` with the routed expert
kernel ``W [E, in, out]``: rows ``[o_e, o_e + n_e)`` use ``W[e]``. With expert
adapters ``A [E, in, r]`` and ``B [E, r, out]`` (the expert axis a stacked axis
of the adapter) the low-rank term is two grouped matmuls with the same group sizes,

  ``t = s · ragged_dot(x, A)``  ``[m, r]``,  ``term = ragged_dot(t, B)``  ``[m, out]``,

so no per-expert ``B·A`` is ever formed. The backward pass is four more grouped
matmuls: ``dt = ragged_dot(dy, Bᵀ)``, ``dB = tᵀ·dy`` and ``dA = xᵀ·(s·dt)`` per
group (``ragged_dot_general``'s ragged-contraction mode, one ``[r, out]`` /
``[in, r]`` block per expert), ``dx = (s·dt)·Aᵀ`` per group: six rank-``r`` grouped
matmuls in all, as for a dense layer, on ``m·r·(in+out)`` multiply-adds each pair
(``m`` = tokens × top-k). Under the custom-VJP lowering (``ctx.custom_vjp``) the term
saves ``t`` and the roots the layer input is rebuilt from (``jlora._apply.recompute``:
``x_sorted`` is a gather of the normalised hidden states, ``top_k`` times smaller,
and the down projection's input is ``silu(g)·u`` of outputs the floor keeps), and
redraws a dropout mask from its key; the transposes are JAX's own
(``jax.linear_transpose`` of each grouped matmul). On CPU (``MASKED_BACKENDS``) that
lowering writes each rank-``r`` grouped matmul as a dense product masked on the rank
side (``_masked``): XLA:CPU lowers ``ragged_dot`` itself to a masked dense product,
with a temporary of the layer's full input width per product.

``ragged_plan`` labels the operands (``RaggedPlan``): JAX's "mode 1" (the ragged
dimension of the input is not contracted; the kernel has the group dimension),
with any batch dimensions. The group axis must be a stacked axis of the adapter,
as ``KernelLayout(batch_axes=(0, 1), in_axes=(2,))`` makes it for ``[L, E, in, out]``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jlora._apply.consumers.contraction import cast, scaled, transpose
from jlora._apply.consumers.custom_vjp import _keep_mask, _late_input, _prep, _Term
from jlora._apply.consumers.layer_input import lora_input
from jlora._apply.consumers.plans import orientation
from jlora._apply.context import ConsumerContext
from jlora._apply.lowrank import RANK, Label, LowRank, new_label
from jlora._apply.recompute import Recompute
from jlora._errors import Unsupported


@dataclasses.dataclass(frozen=True)
class RaggedPlan:
  """How a ``ragged_dot_general`` consumes a LoRA kernel (its ``rhs``), in labels.

  ``x_labels``/``out_labels`` label the input and the result (the contracted and
  batch axes share the kernel's labels); ``group`` is the kernel's group (expert)
  label; ``a_order``/``b_order`` are the factor layouts the two grouped matmuls use:
  ``A`` in the kernel's axis order with its output axes replaced by the rank, ``B``
  as ``(group, batch..., rank, output axes...)``; ``dn1``/``dn2`` their dimension
  numbers.
  """

  x_labels: tuple
  out_labels: tuple
  group: Label
  ragged: Label  # the input's ragged (sorted rows) axis
  dn: Any  # the equation's own dimension numbers (for the base kernel)
  a_order: tuple
  b_order: tuple
  dn1: Any
  dn2: Any
  precision: Any
  out_dtype: Any
  recompute: Recompute | None = None
  # ``rows(ids)``: per-example ``ids`` (the model inputs' leading shape) at every element of the input,
  # following its rows back through the sort (``jlora._apply.rows``; ``None`` if they cannot be).
  rows: Callable[[Any], Any] | None = None


def ragged_plan(v: LowRank, x, *, dimension_numbers, precision, out_dtype,
                recompute: Recompute | None = None, rows: Callable[[Any], Any] | None = None) -> RaggedPlan:
  """Labels ``ragged_dot_general(x, v, group_sizes)``; raises ``Unsupported`` for other modes."""
  rdn = dimension_numbers
  (lc, rc), (lb, rb) = rdn.dot_dimension_numbers
  if len(rdn.lhs_ragged_dimensions) != 1 or len(rdn.rhs_group_dimensions) != 1:
    raise Unsupported("a ragged_dot_general that contracts or batches over its ragged dimension (only the "
                      "grouped matmul of a mixture of experts, 'mode 1', has a low-rank form)")
  (ragged,), (gd,) = rdn.lhs_ragged_dimensions, rdn.rhs_group_dimensions
  if ragged in lc or ragged in lb:
    raise Unsupported("a ragged_dot_general whose ragged dimension is contracted or batched")
  x_labels: list[Label] = [new_label() for _ in range(x.ndim)]
  for xi, vi in zip(lc, rc):
    x_labels[xi] = v.labels[vi]
  for xi, vi in zip(lb, rb):
    x_labels[xi] = v.labels[vi]
  group = v.labels[gd]
  if not {"a", "b"} <= v.holders(group):
    raise Unsupported(
        "a ragged_dot over a kernel whose group (expert) axis is not a stacked axis of its adapter; create the "
        "adapters with that axis in batch_axes, e.g. jlora.KernelLayout(batch_axes=(0, 1), in_axes=(2,)) for a "
        "stacked [layers, experts, in, out] kernel")
  orientation(v, frozenset(v.labels[i] for i in rc), "contracted by a ragged_dot")
  free = [i for i in range(len(v.labels)) if i not in rc and i not in rb and i != gd]
  x_free = [x_labels[i] for i in range(x.ndim) if i not in lc and i not in lb]
  batch = [v.labels[i] for i in rb]
  out_labels = (*batch, *x_free, *(v.labels[i] for i in free))
  # Step 1: t = ragged(x, A) with A laid out like the kernel, its output axes replaced by one rank axis.
  a_order: list[Label] = []
  for i, l in enumerate(v.labels):
    if i in free:
      if RANK not in a_order:
        a_order.append(RANK)
    else:
      a_order.append(l)
  if RANK not in a_order:
    a_order.append(RANK)
  pos = {l: i for i, l in enumerate(a_order)}
  dn1 = lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=((tuple(lc), tuple(pos[v.labels[i]] for i in rc)),
                             (tuple(lb), tuple(pos[v.labels[i]] for i in rb))),
      lhs_ragged_dimensions=(ragged,), rhs_group_dimensions=(pos[group],))
  # Step 2: term = ragged(t, B); t is (batch..., x free..., rank), B is (group, batch..., rank, outputs...).
  nb = len(batch)
  b_order = (group, *batch, RANK, *(v.labels[i] for i in free))
  t_ragged = nb + [i for i in range(x.ndim) if i not in lc and i not in lb].index(ragged)
  t_rank = nb + len(x_free)
  dn2 = lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(((t_rank,), (1 + nb,)), (tuple(range(nb)), tuple(range(1, 1 + nb)))),
      lhs_ragged_dimensions=(t_ragged,), rhs_group_dimensions=(0,))
  return RaggedPlan(tuple(x_labels), out_labels, group, x_labels[ragged], rdn, tuple(a_order), b_order, dn1, dn2,
                    precision, out_dtype, recompute, rows)


def _arrange(f, f_labels, order):
  return transpose(f, [list(f_labels).index(l) for l in order])


def _back(d, order, f_labels):
  return transpose(d, [list(order).index(l) for l in f_labels])


# Backends on which the custom-VJP lowering computes the rank-r grouped matmuls as masked dense
# products (``_masked``) instead of ``ragged_dot``: XLA:CPU has no grouped-matmul kernel and lowers
# ``ragged_dot`` itself to a masked dense product, but masks the *input* side, a temporary of
# ``[E, rows, in]`` per product (32 MiB for 2048 rows of 256 features and 16 experts) where the
# rank-r side needs ``[rows, E·r]`` (1 MiB): the same FLOPs, a fraction of the memory
# (benchmarks/expert_lora.py). Elsewhere (TPU, GPU) ``ragged_dot`` is the grouped kernel.
MASKED_BACKENDS: tuple[str, ...] = ("cpu",)


def _standard(dn) -> bool:
  """``lax.ragged_dot``'s own form: ``[m, k]`` rows, ``[E, k, n]`` kernel, no batch dimensions."""
  return (dn.dot_dimension_numbers == (((1,), (1,)), ((), ())) and tuple(dn.lhs_ragged_dimensions) == (0,)
          and tuple(dn.rhs_group_dimensions) == (0,))


def _ragged(x, f, sizes, dn, precision, masked: bool = False):
  """The grouped matmul ``x·f[group of each row]``: ``ragged_dot``, or its masked dense form (``_masked``)."""
  if masked and x.ndim == 2 and f.ndim == 3 and _standard(dn):
    return _masked(x, f, sizes, precision)
  return lax.ragged_dot_general(x, f, sizes, dn, precision=precision)


def _masked(x, f, sizes, precision):
  """``ragged_dot(x [m, k], f [E, k, n], sizes)`` as one dense matmul with every expert's ``f``, the rows
  masked to their own expert on the narrower side (``k`` or ``n``: the rank ``r`` in a low-rank term).
  Rows past the last group give zero, as in ``ragged_dot``; its transposes (``jax.linear_transpose``)
  are masked matmuls too."""
  m, k = x.shape
  experts, _, n = f.shape
  onehot = (row_groups(sizes, m)[:, None] == jnp.arange(experts, dtype=sizes.dtype)[None]).astype(x.dtype)
  if n <= k:  # mask the output: [m, E·n]
    y = lax.dot_general(x, transpose(f, (1, 0, 2)).reshape(k, experts * n), (((1,), (0,)), ((), ())),
                        precision=precision)
    return jnp.sum(y.reshape(m, experts, n) * onehot[:, :, None], axis=1)
  xm = (x[:, None, :] * onehot[:, :, None]).reshape(m, experts * k)  # mask the input: [m, E·k]
  return lax.dot_general(xm, f.reshape(experts * k, n), (((1,), (0,)), ((), ())), precision=precision)


@dataclasses.dataclass(frozen=True, eq=False)
class _Static:
  """Static parts of one grouped low-rank term (see ``ragged_term``)."""

  plan: RaggedPlan
  term: _Term  # scale, dropout rate, factor dtype, rebuild, output dtype
  masked: bool  # the grouped matmuls as masked dense products (``MASKED_BACKENDS``)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _grouped(st: _Static, x, roots, a, b, sizes, key_data):
  return _grouped_fwd(st, x, roots, a, b, sizes, key_data)[0]


def _grouped_fwd(st: _Static, x, roots, a, b, sizes, key_data):
  p, tm = st.plan, st.term
  keep = None if key_data is None else _keep_mask(tm, key_data, x.shape)
  t = scaled(_ragged(_prep(tm, x, keep), a, sizes, p.dn1, p.precision, st.masked), tm.scale)
  y = cast(_ragged(t, b, sizes, p.dn2, p.precision, st.masked), tm.out_dtype)
  saved = roots if tm.rebuild is not None else x
  return y, (saved, a, b, t, sizes, key_data, jnp.zeros((0,), x.dtype))


def _grouped_bwd(st: _Static, res, dy):
  saved, a, b, t, sizes, key_data, x_dtype = res
  p, tm = st.plan, st.term
  dy = cast(dy, b.dtype)
  # JAX's own transposes of the two grouped matmuls: ragged_dot (mode 1) for the inputs, the
  # ragged-contraction mode (one block per group) for the factors. No per-expert B·A.
  mk = st.masked
  dt = jax.linear_transpose(lambda t_: _ragged(t_, b, sizes, p.dn2, p.precision, mk), t)(dy)[0]
  db = jax.linear_transpose(lambda b_: _ragged(t, b_, sizes, p.dn2, p.precision, mk), b)(dy)[0]
  dt = scaled(dt, tm.scale)
  x, key_data, dt, dep = _late_input(tm.rebuild, saved, key_data, dt)
  keep = None if key_data is None else _keep_mask(tm, key_data, x.shape, dep)
  xin = _prep(tm, x, keep)
  da = jax.linear_transpose(lambda a_: _ragged(xin, a_, sizes, p.dn1, p.precision, mk), a)(dt)[0]
  dx = jax.linear_transpose(lambda x_: _ragged(x_, a, sizes, p.dn1, p.precision, mk), xin)(dt)[0]
  if keep is not None:
    dx = jnp.where(keep, dx / (1.0 - tm.rate), jnp.zeros_like(dx))
  return cast(dx, x_dtype.dtype), None, da, db, None, None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def ragged_term(ctx: ConsumerContext, v: LowRank, x, group_sizes, plan: RaggedPlan, *, scale,
                factors: tuple[Any, Any] | None = None):
  """``scale · ragged_dot(ragged_dot(dropout(x), A), B)``: the grouped low-rank term, in ``plan.out_dtype``.

  ``factors`` optionally replaces ``(a, b)`` (same labels), e.g. a variant's effective
  factors. Under the custom-VJP lowering the term saves ``t`` and the input (or the
  roots ``plan.recompute`` rebuilds it from); otherwise it is plain autodiff of the
  two grouped matmuls (whose transposes are grouped matmuls too).
  """
  spec = v.source.spec
  if not ctx.custom_vjp:
    return grouped_two_step(lora_input(ctx, v, x), v, group_sizes, plan, scale=scale, factors=factors)
  a, b = factors if factors is not None else (v.a, v.b)
  a = _arrange(a, v.a_labels, plan.a_order)
  b = _arrange(b, v.b_labels, plan.b_order)
  key = ctx.next_key()
  key_data = None if key is None or spec.dropout <= 0.0 else jax.random.key_data(key)
  rec = plan.recompute
  term = _Term(labels=(), scale=scale, precision=plan.precision, fused=False, rate=float(spec.dropout),
               dtype=a.dtype, rebuild=None if rec is None else rec.rebuild, out_dtype=plan.out_dtype)
  roots = () if rec is None else tuple(rec.roots)
  masked = jax.default_backend() in MASKED_BACKENDS
  return _grouped(_Static(plan, term, masked), x, roots, a, b, group_sizes, key_data)


def grouped_two_step(xin, v: LowRank, group_sizes, plan: RaggedPlan, *, scale, factors=None):
  """``scale · ragged(ragged(xin, A), B)`` under plain autodiff, for an input already dropped out (or not).

  Its transposes are grouped matmuls too (JAX's rules), so no per-expert ``B·A`` either.
  """
  a, b = factors if factors is not None else (v.a, v.b)
  a = _arrange(a, v.a_labels, plan.a_order)
  b = _arrange(b, v.b_labels, plan.b_order)
  t = scaled(_ragged(cast(xin, a.dtype), a, group_sizes, plan.dn1, plan.precision), scale)
  return cast(_ragged(t, b, group_sizes, plan.dn2, plan.precision), plan.out_dtype)


def base_ragged(xin, kernel, group_sizes, plan: RaggedPlan):
  """The equation's own grouped matmul of ``xin`` with a dense ``kernel`` (e.g. DoRA's base on a dropped-out input)."""
  dtype = jnp.result_type(xin.dtype, kernel.dtype)
  y = _ragged(cast(xin, dtype), cast(kernel, dtype), group_sizes, plan.dn, plan.precision)
  return cast(y, plan.out_dtype)


def per_row(values, labels, group: Label, rows_label: Label, group_sizes, rows: int):
  """A per-group array (``labels`` hold ``group``) taken at each sorted row's group: ``group`` becomes
  ``rows_label``. Rows past the last group take the last group's values (their results are zero)."""
  labels = list(labels)
  k = labels.index(group)
  idx = jnp.minimum(row_groups(group_sizes, rows), values.shape[k] - 1)
  out = jnp.take(values, idx, axis=k)
  labels[k] = rows_label
  return out, labels


def row_groups(group_sizes, rows: int):
  """The group of each of ``rows`` sorted rows (``len(group_sizes)`` for rows past the last group)."""
  ends = jnp.cumsum(group_sizes)
  return jnp.searchsorted(ends, jnp.arange(rows, dtype=ends.dtype), side="right")
