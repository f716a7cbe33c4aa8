"""Structural rules: ops through which a LoRA kernel stays a kernel (the factors follow the base).

The op runs on the base (a lazy base records it instead); the ``LowRank``
value's labels follow a transpose, its small factors are reshaped or sliced
with the kernel, and a scalar multiple scales one factor (the variant decides
which: ``Variant.scale_kernel``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as P

from jlora._apply import lowrank
from jlora._apply.base_result import base_out
from jlora._apply.rules import STRUCTURAL, is_lowrank, rule, single
from jlora._errors import Unsupported
from jlora._lazy import LazyBase


def structural(*prims):
  """A rule for ops whose first operand is the LoRA kernel: the op runs on the base, then
  ``update(v, eqn, out, rest)`` relabels / reshapes the factors (the other operands ``rest``
  must not be LoRA kernels). A lazy base records the op instead of running it."""

  def deco(update):
    def apply(interp, eqn, invals):
      v, rest = single(invals)
      if any(is_lowrank(x) for x in rest):
        raise Unsupported("")
      if isinstance(v.base, LazyBase):
        out = v.base.record(eqn.primitive, eqn.params, rest)
      else:
        outs = base_out(eqn, invals)
        if len(outs) != 1:
          raise Unsupported("")
        out = outs[0]
      return [update(v, eqn, out, rest)]

    STRUCTURAL.update(prims)
    return rule(*prims)(apply)

  return deco


@structural(P.convert_element_type_p, P.copy_p, P.reduce_precision_p, P.sharding_constraint_p,
            P.device_put_p)
def _passthrough(v, eqn, out, rest):
  return v.with_base(out)


@structural(P.transpose_p)
def _transpose(v, eqn, out, rest):
  return v.transpose(eqn.params["permutation"], out)


@structural(P.squeeze_p)
def _squeeze(v, eqn, out, rest):
  return v.reshape(out.shape, out)


@structural(P.reshape_p)
def _reshape(v, eqn, out, rest):
  if rest or eqn.params.get("dimensions") is not None:
    raise Unsupported("a reshape with dynamic shapes or a dimension permutation")
  return v.reshape(out.shape, out)


@structural(P.broadcast_in_dim_p)
def _broadcast(v, eqn, out, rest):
  if rest or not lowrank.is_unit_broadcast(v.base.shape, out.shape, eqn.params["broadcast_dimensions"]):
    raise Unsupported("a broadcast that tiles the kernel")
  return v.reshape(out.shape, out)


@structural(P.slice_p)
def _slice(v, eqn, out, rest):
  p = eqn.params
  strides = p["strides"] or (1,) * len(p["start_indices"])
  slices = {}
  for ax, (s, e, st) in enumerate(zip(p["start_indices"], p["limit_indices"], strides)):
    if (s, e, st) != (0, v.base.shape[ax], 1):
      slices[ax] = (s, out.shape[ax], st)
  return v.slice_axes(slices, out, dynamic=False)


@structural(P.dynamic_slice_p)
def _dynamic_slice(v, eqn, out, starts):
  sizes = eqn.params["slice_sizes"]
  slices = {ax: (starts[ax], sizes[ax], 1) for ax in range(len(sizes)) if sizes[ax] != v.base.shape[ax]}
  return v.slice_axes(slices, out, dynamic=True)


@structural(P.neg_p)
def _neg(v, eqn, out, rest):
  return v.scale_by(-1.0, out)


@structural(P.stop_gradient_p)
def _stop_gradient(v, eqn, out, rest):
  return v.map_factors(lax.stop_gradient, out)


@rule(P.mul_p, P.div_p)
def _scalar_mul(interp, eqn, invals):
  x, y = invals
  if is_lowrank(x) and not is_lowrank(y):
    v, c = x, y
  elif is_lowrank(y) and not is_lowrank(x) and eqn.primitive is P.mul_p:
    v, c = y, x
  else:
    raise Unsupported("")
  if jnp.ndim(c) != 0:
    raise Unsupported("an elementwise product with a non-scalar")
  if isinstance(v.base, LazyBase):  # kernel*c, c*kernel or kernel/c: replayed as (kernel, c)
    out = v.base.record(eqn.primitive, eqn.params, [c])
  else:
    (out,) = base_out(eqn, invals)
  factor = c if eqn.primitive is P.mul_p else 1.0 / jnp.asarray(c, jnp.float32)
  return [v.scale_by(factor, out)]
