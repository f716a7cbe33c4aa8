"""Plain LoRA where its kernel is consumed: ``Variant``'s default rules, and the pieces variants reuse.

``dot``, ``conv``, ``gather`` and ``ragged_dot`` (routed experts) are plain LoRA's consumer rules; this module
registers them as the defaults of ``jlora.Variant.dot``/``conv``/``gather`` when
it is imported (``jlora._variant.register_plain_rules``). ``lora_dot_term`` is
the plain two-step contraction of a matmul (dropout, optional fused expansion,
the custom-VJP lowering) and ``two_step`` the same under plain autodiff:
variants build their own rules from these (and from ``layer_input``).
"""

from __future__ import annotations

from jlora._apply.consumers.contraction import cast, contract_two_step, lowrank_labels
from jlora._apply.consumers.conv import conv_term
from jlora._apply.consumers.custom_vjp import add_term, lowrank_term
from jlora._apply.consumers.gather import gather_term
from jlora._apply.consumers.layer_input import lora_input
from jlora._apply.consumers.plans import DotPlan, factor_order
from jlora._apply.consumers.ragged import RaggedPlan, ragged_term
from jlora._apply.context import ConsumerContext, fused_for
from jlora._apply.lowrank import LowRank
from jlora._variant import register_plain_rules


def lora_dot_term(ctx: ConsumerContext, v: LowRank, x, plan: DotPlan, *, scale, factors=None):
  """The scaled low-rank term of a ``dot_general`` for factors ``a`` and ``b``.

  ``factors`` optionally replaces ``(a, b)`` (same labels), e.g. a variant's
  effective factors. Under the custom-VJP lowering the term saves neither the
  input when ``plan.recompute`` can rebuild it nor a dropout mask.
  """
  f1, l1, f2, l2 = factor_order(v, plan, factors)
  labels = lowrank_labels(plan.x_labels, l1, l2, plan.out_labels)
  spec = v.source.spec
  fused = fused_for(ctx, spec.rank)
  if ctx.custom_vjp:
    y = lowrank_term(x, f1, f2, labels=labels, scale=scale, precision=plan.precision, fused=fused,
                     rate=spec.dropout, key=ctx.next_key(), recompute=plan.recompute,
                     out_dtype=plan.out_dtype)
  else:
    xin = lora_input(ctx, v, x)
    y = cast(two_step(xin, f1, f2, labels=labels, scale=scale, precision=plan.precision, fused=fused),
             plan.out_dtype)
  return y


def two_step(x, f1, f2, *, labels, scale, precision, fused: bool):
  """``scale · ((x·f1)·f2)`` with ``labels`` from ``lowrank_labels``; fused expansion if asked.

  The fused form runs under a custom VJP (``custom_vjp.lowrank_term``) that saves ``x``.
  """
  if fused:
    return lowrank_term(x, f1, f2, labels=labels, scale=scale, precision=precision, fused=True)
  return contract_two_step(x, f1, f2, scale=scale, labels=labels, precision=precision, fused=False)[0]


# -- plain LoRA's rules: the defaults of Variant.dot / conv / gather ------------------------------


def dot(ctx: ConsumerContext, v: LowRank, x, base_out, plan: DotPlan):
  """``base_out + scale·((x·A)·B)``, the sum materialised once (``custom_vjp.add_term``)."""
  return add_term(ctx, v, base_out, lora_dot_term(ctx, v, x, plan, scale=v.source.spec.scale))


def conv(ctx: ConsumerContext, v: LowRank, x, base_out, params: dict):
  """``base_out`` plus the low-rank term of a convolution (``conv_term``)."""
  return base_out + conv_term(v, x, params=params, out_dtype=base_out.dtype, key=ctx.next_key())


def gather(ctx: ConsumerContext, v: LowRank, indices, base_out, params: dict):
  """``base_out`` plus the low-rank term of an embedding lookup (``gather_term``)."""
  return base_out + gather_term(v, indices, params=params, out_dtype=base_out.dtype)


def ragged_dot(ctx: ConsumerContext, v: LowRank, x, group_sizes, base_out, plan: RaggedPlan):
  """``base_out + scale·ragged_dot(ragged_dot(x, A), B)`` (routed experts), the sum materialised once."""
  return add_term(ctx, v, base_out, ragged_term(ctx, v, x, group_sizes, plan, scale=v.source.spec.scale))


register_plain_rules(dot=dot, conv=conv, gather=gather, ragged_dot=ragged_dot)
