"""Consumer rules: ``dot_general``, ``conv_general_dilated``, ``gather`` and ``ragged_dot_general``
(the grouped matmul of routed experts) of a LoRA kernel.

Each computes the base result (``base_result``) and hands the layer input and
that result to the adapter's variant (``Variant.dot``/``conv``/``gather``/``ragged_dot``),
which adds its low-rank term (``jlora._apply.consumers``). In probe mode
(``jlora.infer_layout``) the rules only record which kernel axes the use
contracts.
"""

from __future__ import annotations

import functools

from jax.extend.core import primitives as P

from jlora._apply import lowrank
from jlora._apply.base_result import base_out
from jlora._apply.consumers import plain  # noqa: F401  (registers plain LoRA's rules with jlora.Variant)
from jlora._apply.consumers.plans import dot_plan
from jlora._apply.consumers.ragged import ragged_plan
from jlora._apply.primitives import ragged_dot_general_p
from jlora._apply.rules import is_lowrank, rule, single
from jlora._errors import Unsupported


@rule(P.dot_general_p)
def _dot_general(interp, eqn, invals):
  lhs, rhs = invals
  if is_lowrank(lhs) and is_lowrank(rhs):
    raise Unsupported("a product of two LoRA kernels")
  (out,) = base_out(eqn, invals)
  v_is_lhs = is_lowrank(lhs)
  v, x = (lhs, rhs) if v_is_lhs else (rhs, lhs)
  dn = eqn.params["dimension_numbers"]
  if interp.mode == "probe":
    (lc, rc), (lb, rb) = dn
    vc, vb = (lc, lb) if v_is_lhs else (rc, rb)
    interp.record(v, {
        "kind": "dot",
        "in": lowrank.provenance(v.labels[i] for i in vc),
        "batch": tuple(sorted(set(lowrank.provenance(v.labels[i] for i in vb)) | set(v.dropped))),
    })
    return [out]
  if not v.has_factors:
    return [out]
  x_var = eqn.invars[1] if v_is_lhs else eqn.invars[0]
  recompute = interp.recompute(x_var, rank=v.source.spec.rank) if interp.custom_vjp else None
  plan = dot_plan(v, x, v_is_lhs=v_is_lhs, dimension_numbers=dn, precision=eqn.params["precision"],
                  out_dtype=out.dtype, recompute=recompute, rows=functools.partial(interp.trace_rows, x_var))
  return [v.source.spec.variant.dot(interp, v, x, out, plan)]


@rule(P.conv_general_dilated_p)
def _conv(interp, eqn, invals):
  lhs, rhs = invals
  if is_lowrank(lhs):
    raise Unsupported("a LoRA kernel used as the convolution input")
  (out,) = base_out(eqn, invals)
  if interp.mode == "probe":
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec
    interp.record(rhs, {
        "kind": "conv",
        "in": lowrank.provenance(l for i, l in enumerate(rhs.labels) if i != rhs_spec[0]),
        "batch": tuple(sorted(rhs.dropped)),
    })
    return [out]
  if not rhs.has_factors:
    return [out]
  return [rhs.source.spec.variant.conv(interp, rhs, lhs, out, eqn.params)]


@rule(P.gather_p)
def _gather(interp, eqn, invals):
  v, (indices,) = single(invals)
  (out,) = base_out(eqn, invals)
  if interp.mode == "probe":
    dn = eqn.params["dimension_numbers"]
    interp.record(v, {
        "kind": "gather",
        "in": lowrank.provenance(v.labels[d] for d in dn.start_index_map),
        "batch": tuple(sorted(v.dropped)),
    })
    return [out]
  if not v.has_factors:
    return [out]
  return [v.source.spec.variant.gather(interp, v, indices, out, eqn.params)]


@rule(ragged_dot_general_p)
def _ragged_dot(interp, eqn, invals):
  lhs, rhs, sizes = invals
  if is_lowrank(lhs) or is_lowrank(sizes) or not is_lowrank(rhs):
    raise Unsupported("a LoRA kernel as the grouped input of a ragged_dot (only the grouped kernel, its "
                      "second operand, has a low-rank form)")
  (out,) = base_out(eqn, invals)
  rdn = eqn.params["ragged_dot_dimension_numbers"]
  if interp.mode == "probe":
    (_, rc), (_, rb) = rdn.dot_dimension_numbers
    interp.record(rhs, {
        "kind": "dot",
        "in": lowrank.provenance(rhs.labels[i] for i in rc),
        "batch": tuple(sorted(set(lowrank.provenance(rhs.labels[i] for i in (*rb, *rdn.rhs_group_dimensions)))
                              | set(rhs.dropped))),
    })
    return [out]
  if not rhs.has_factors:
    return [out]
  if eqn.params.get("group_offset") is not None:
    raise Unsupported("ragged_dot with group_offset")
  recompute = interp.recompute(eqn.invars[0], rank=rhs.source.spec.rank) if interp.custom_vjp else None
  plan = ragged_plan(rhs, lhs, dimension_numbers=rdn, precision=eqn.params["precision"], out_dtype=out.dtype,
                     recompute=recompute, rows=functools.partial(interp.trace_rows, eqn.invars[0]))
  return [rhs.source.spec.variant.ragged_dot(interp, rhs, lhs, sizes, out, plan)]
