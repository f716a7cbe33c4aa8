"""DoRA (weight-decomposed low-rank adaptation, Liu et al. 2024) as a ``jlora.Variant``.

The adapted kernel is ``W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖``, the norm taken over
the input axes per output feature (PEFT's ``torch.linalg.norm(W, dim=1)`` on the
``[out, in]`` weight), and ``m`` (``magnitude``, one value per output and stacked
feature) trained beside A and B. In the forward pass the norm is *detached*
(paper §4.3, as PEFT does), so a consumer computes

  ``out = (m/n) ⊙ (x·W0 + s·(x·A)·B)`` with ``n = stop_gradient(‖W0 + s·BA‖)``

(PEFT's ``base + (m/n − 1)·base + (m/n)·s·B(Ax)``). The norm is never taken of a
materialised ``W0 + s·BA``: ``n² = ‖W0‖² + 2s·⟨W0, BA⟩ + s²‖BA‖²`` needs one pass
over ``W0`` (``‖W0‖²`` and ``W0ᵀA``, a rank-r product) and ``AᵀA`` (r×r), so a DoRA
step costs one extra read of each frozen kernel, not a dense merge.

With LoRA dropout (training only) the base is recomputed on the dropped-out
input for the ``(m/n − 1)`` term, as PEFT does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jlora._apply.consumers.conv import conv_term
from jlora._apply.consumers.contraction import lowrank_labels
from jlora._apply.consumers.gather import gather_term
from jlora._apply.consumers.layer_input import dropout
from jlora._apply.consumers.plain import two_step
from jlora._apply.consumers.plans import DotPlan, factor_order
from jlora._apply.consumers.ragged import RaggedPlan, base_ragged, grouped_two_step, per_row
from jlora._apply.context import ConsumerContext, fused_for
from jlora._apply.lowrank import Letters, LowRank, Source, new_label, special_label
from jlora._lazy import dense
from jlora._variant import AxisSpec, Variant, lowrank_delta
from jlora._weight import LoraSpec, LoraWeight
from jlora.variants import _labels


def kernel_norm(spec: LoraSpec, w0: Any, a: Any, b: Any, scale: float | None = None) -> jax.Array:
  """``‖w0 + s·(a⊗b)‖`` over the input axes, laid out ``(*batch_axes, *out_axes)`` (float32).

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> from jlora.variants._dora import kernel_norm
    >>> spec = jlora.LoraSpec(shape=(3, 2), layout=jlora.KernelLayout(in_axes=(0,)), rank=1, alpha=1.0)
    >>> kernel_norm(spec, jnp.array([[3., 0.], [4., 0.], [0., 1.]]), jnp.zeros((3, 1)), jnp.zeros((1, 2)))
    Array([5., 1.], dtype=float32)
  """
  labels = [new_label(frozenset({i})) for i in range(len(spec.shape))]
  plain = Variant.factor_axes(Variant(), spec)
  flabels = {n: [labels[ax] if isinstance(ax, int) else special_label(ax) for ax in axes]
             for n, axes in plain.items()}
  v = LowRank(dense(w0), {"a": a, "b": b}, labels, flabels, Source("", spec, 0))
  n, n_labels = _labels.weight_norm(v, a, b, spec.scale if scale is None else scale)
  want = [labels[i] for i in (*spec.batch_axes, *spec.out_axes)]
  return jnp.transpose(n, [n_labels.index(l) for l in want])


def _kernel_view(spec: LoraSpec, x: jax.Array) -> jax.Array:
  """A ``(*batch, *out)`` array reshaped to broadcast against the kernel layout."""
  order = list(spec.batch_axes) + list(spec.out_axes)
  perm = sorted(range(len(order)), key=lambda i: order[i])
  x = jnp.transpose(x, perm)
  return jnp.reshape(x, [spec.shape[i] if i in order else 1 for i in range(len(spec.shape))])


@dataclasses.dataclass(frozen=True)
class DoRA(Variant):
  """DoRA: a trained magnitude per output feature over the normalised ``W0 + s·BA``.

  ``jlora.LoraConfig(dora=True)`` is short for ``variant=jlora.DoRA()``. The
  magnitude is initialised to ``‖W0 + s·BA‖`` of the initial factors (``‖W0‖``
  with the default init, B = 0), so a new DoRA adapter leaves the model
  unchanged. Works wherever plain LoRA does (matmuls of any layout, stacked
  layers under ``scan``, convolutions, embedding lookups, lazy/quantized bases).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> lp = jlora.init(jax.random.key(0), {"w": jnp.ones((8, 4))}, jlora.LoraConfig(rank=2, targets="w", dora=True))
    >>> lp["w"].factors["magnitude"]
    Array([2.828427, 2.828427, 2.828427, 2.828427], dtype=float32)
  """

  name = "dora"

  # -- storage ---------------------------------------------------------------------------
  def factor_axes(self, spec: LoraSpec) -> dict[str, AxisSpec]:
    return {**super().factor_axes(spec), "magnitude": (*spec.batch_axes, *spec.out_axes)}

  def init_extras(self, spec: LoraSpec, w0: Any, factors: Mapping[str, Any]) -> dict[str, Any]:
    m = kernel_norm(spec, w0, factors["a"], factors["b"])
    return {"magnitude": m.astype(factors["a"].dtype)}

  # -- the apply path ----------------------------------------------------------------------
  def _ratio(self, v: LowRank, what: str):
    """``m / stop_gradient(n)`` and its labels (stacked and output labels, value order)."""
    _labels.check_full_input(v, what)
    spec = v.source.spec
    n, labels = _labels.weight_norm(v, lax.stop_gradient(v.a), lax.stop_gradient(v.b), spec.scale)
    m = _labels.align(v.factors["magnitude"].astype(jnp.float32), v.flabels["magnitude"], labels)
    return m / lax.stop_gradient(n), labels

  def dot(self, ctx: ConsumerContext, v: LowRank, x: Any, base_out: Any, plan: DotPlan) -> Any:
    ratio, labels = self._ratio(v, "DoRA's norm")
    spec = v.source.spec
    key = ctx.next_key() if spec.dropout > 0 else None
    xin = dropout(x, spec.dropout, key)
    if plan.first == "b":  # a tied embedding used as the output projection: W'ᵀ scales the input
      scaled = x * _labels.align(ratio, labels, plan.x_labels).astype(x.dtype)
      xin = dropout(scaled, spec.dropout, key)
      return _base_dot(v, scaled, plan) + self._term(ctx, v, xin, plan)
    r = _labels.align(ratio, labels, plan.out_labels).astype(base_out.dtype)
    term = self._term(ctx, v, xin, plan)
    if key is None:
      return r * (base_out + term)
    # PEFT under training dropout: base + (m/n − 1)·(dropout(x)·W0) + (m/n)·s·B(A·dropout(x)).
    return base_out + (r - 1) * _base_dot(v, xin, plan) + r * term

  def _term(self, ctx: ConsumerContext, v: LowRank, xin, plan: DotPlan) -> Any:
    spec = v.source.spec
    f1, l1, f2, l2 = factor_order(v, plan)
    labels = lowrank_labels(plan.x_labels, l1, l2, plan.out_labels)
    fused = fused_for(ctx, spec.rank)
    y = two_step(xin.astype(v.a.dtype), f1, f2, labels=labels, scale=spec.scale, precision=plan.precision,
                 fused=fused)
    return y.astype(plan.out_dtype)

  def conv(self, ctx: ConsumerContext, v: LowRank, x: Any, base_out: Any, params: dict) -> Any:
    ratio, labels = self._ratio(v, "DoRA's norm")
    spec = v.source.spec
    key = ctx.next_key() if spec.dropout > 0 else None
    xin = dropout(x, spec.dropout, key)
    term = conv_term(v, xin, params=params, out_dtype=base_out.dtype, key=None)
    rhs_spec, out_spec = params["dimension_numbers"].rhs_spec, params["dimension_numbers"].out_spec
    shape = [1] * base_out.ndim
    shape[out_spec[1]] = base_out.shape[out_spec[1]]
    out_label = v.labels[rhs_spec[0]]
    r = _labels.align(ratio, labels, [out_label]).reshape(shape).astype(base_out.dtype)
    if key is None:
      return r * (base_out + term)
    base_d = lax.conv_general_dilated_p.bind(xin, _labels.dense_base(v), **params)
    return base_out + (r - 1) * base_d + r * term

  def gather(self, ctx: ConsumerContext, v: LowRank, indices: Any, base_out: Any, params: dict) -> Any:
    ratio, labels = self._ratio(v, "DoRA's norm")
    term = gather_term(v, indices, params=params, out_dtype=base_out.dtype)
    dn = params["dimension_numbers"]
    collapsed = {v.labels[d] for d in dn.collapsed_slice_dims}
    kept = iter([l for l in v.labels if l not in collapsed])
    out_labels = [next(kept) if d in dn.offset_dims else new_label() for d in range(base_out.ndim)]
    r = _labels.align(ratio, labels, out_labels).astype(base_out.dtype)
    return r * (base_out + term)

  def ragged_dot(self, ctx: ConsumerContext, v: LowRank, x: Any, group_sizes: Any, base_out: Any,
                 plan: RaggedPlan) -> Any:
    """Routed experts: each sorted row is scaled by its expert's ``m/n`` (one norm per expert and output)."""
    ratio, labels = self._ratio(v, "DoRA's norm")
    rows = x.shape[plan.x_labels.index(plan.ragged)]
    ratio, labels = per_row(ratio, labels, plan.group, plan.ragged, group_sizes, rows)
    r = _labels.align(ratio, labels, plan.out_labels).astype(base_out.dtype)
    spec = v.source.spec
    key = ctx.next_key() if spec.dropout > 0 else None
    xin = dropout(x, spec.dropout, key)
    term = grouped_two_step(xin, v, group_sizes, plan, scale=spec.scale)
    if key is None:
      return r * (base_out + term)
    return base_out + (r - 1) * base_ragged(xin, _labels.dense_base(v), group_sizes, plan) + r * term

  def scale_kernel(self, v: LowRank, c: Any, base: Any) -> LowRank:
    # c·W' = (|c|·m)/‖c·V‖ ⊙ (c·V) with V = W0 + s·BA: scale A by c and the magnitude by |c|.
    v = v.scale_factor("a", c, base)
    return v.scale_factor("magnitude", jnp.abs(jnp.asarray(c, jnp.float32)), base)

  # -- merging -----------------------------------------------------------------------------
  def merged(self, w: LoraWeight, w0: Any) -> Any:
    """``(m / ‖W0 + ΔW‖) ⊙ (W0 + ΔW)`` in float32, the norm of this adapter's own (unmerged) base."""
    v = w0 + lowrank_delta(w, dtype=jnp.float32)
    spec = w.spec
    n = jnp.sqrt(jnp.sum(jnp.square(v), axis=spec.in_axes, keepdims=True))
    m = _kernel_view(spec, jnp.asarray(w.factors["magnitude"], jnp.float32))
    return v * (m / n)

  def delta(self, w: LoraWeight, dtype: Any) -> Any:
    w0 = dense(w.w0).astype(jnp.float32)
    return (self.merged(w, w0) - w0).astype(dtype)


def _base_dot(v: LowRank, x: jax.Array, plan: DotPlan) -> jax.Array:
  """``x·W0`` (or ``W0·x``) in the consumer's labels, for an input other than the original."""
  L = Letters()
  base = _labels.dense_base(v)
  operands = (base, x) if plan.v_is_lhs else (x, base)
  labels = (v.labels, plan.x_labels) if plan.v_is_lhs else (plan.x_labels, v.labels)
  spec = f"{L(labels[0])},{L(labels[1])}->{L(plan.out_labels)}"
  dtype = jnp.result_type(base.dtype, x.dtype)
  y = jnp.einsum(spec, *(o.astype(dtype) for o in operands), precision=plan.precision)
  return y.astype(plan.out_dtype)

