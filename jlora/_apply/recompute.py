"""Which layer inputs the low-rank path recomputes in the backward pass instead of saving.

The gradient of ``A`` needs the layer input ``x`` (``dA = xᵀ·dt``), which the
frozen model's own backward pass (every activation gradient, no weight
gradient: the *floor*) does not keep: ``dx = dy·W0ᵀ`` needs only ``W0``. Kept
from the forward to the backward pass, one ``x`` per adapted layer is what made
a LoRA step use more memory than the floor. But ``x`` is usually a cheap
elementwise function of values the floor keeps anyway: a normalisation output
is ``w·h/rms(h)`` where the floor keeps the residual stream ``h`` and the
``rms``; a gated MLP's down-projection input is ``silu(g)·u`` where the floor
keeps both factors. The consumer then saves those *roots* instead and rebuilds
``x`` from them in the backward pass (``Recompute``).

The analysis is local to one jaxpr and static:

* a value is *hot* if it depends on a LoRA kernel (it carries a tangent in a
  LoRA step); everything computed before the first adapted layer, and the
  frozen parameters, are cold;
* a value is *kept by the floor* if one of its uses needs its primal value to
  differentiate the hot operands: a product or matmul with a hot other operand
  (LoRA consumers excluded: they are served by this mechanism), the dividend of
  a hot divisor, the divisor of a hot quotient, the operand of any other
  nonlinear operation (``sqrt``, ``exp``, a call...), or a function output;
* the chain walks back from ``x`` through cheap elementwise and layout
  operations and stops at values kept by the floor, at inputs and at anything
  else (matmuls, reductions, calls). It is used only if the roots the floor does
  not keep anyway are smaller than ``x``.

Rebuilding is exact: the same operations run on the same values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from jax.extend import core as jcore
from jax.extend.core import primitives as P

from jlora._apply.primitives import ragged_dot_general_p

# Operations cheap enough to redo in the backward pass (elementwise or layout-only).
_CHEAP = frozenset({
    P.add_p, P.sub_p, P.mul_p, P.div_p, P.neg_p, P.max_p, P.min_p, P.abs_p, P.sign_p,
    P.convert_element_type_p, P.broadcast_in_dim_p, P.reshape_p, P.squeeze_p, P.transpose_p,
    P.copy_p, P.integer_pow_p, P.square_p, P.sqrt_p, P.rsqrt_p, P.select_n_p, P.reduce_precision_p,
    P.gather_p, P.slice_p, P.dynamic_slice_p, P.concatenate_p, P.pad_p,  # cost ∝ output size
    P.eq_p, P.ne_p, P.lt_p, P.le_p, P.gt_p, P.ge_p, P.and_p, P.or_p, P.not_p, P.clamp_p, P.iota_p,
})

# Operations linear in every operand: differentiating them never needs a primal value.
_LINEAR = frozenset({
    P.add_p, P.sub_p, P.neg_p, P.convert_element_type_p, P.broadcast_in_dim_p, P.reshape_p,
    P.squeeze_p, P.transpose_p, P.copy_p, P.reduce_sum_p, P.slice_p, P.dynamic_slice_p,
    P.concatenate_p, P.pad_p, P.select_n_p, P.reduce_precision_p, P.cumsum_p, P.gather_p,
    P.dynamic_update_slice_p, P.sharding_constraint_p, P.device_put_p, P.rev_p, P.stop_gradient_p,
    P.add_jaxvals_p,
})

_BILINEAR = frozenset({P.mul_p, P.dot_general_p, P.conv_general_dilated_p, ragged_dot_general_p})

# Longest chain of operations redone for one layer input.
MAX_CHAIN = 32
# A contraction is redone when it costs at most this many times the adapter's own
# FLOPs per element of the input (about 12·rank: six rank-r matmuls over in ≈ out).
DOT_BUDGET = 1.0


def _is_cheap(eqn) -> bool:
  """Cheap to redo: an elementwise or layout operation, or a call made only of those."""
  if eqn.primitive in _CHEAP:
    return True
  if eqn.primitive is P.jit_p:
    inner = eqn.params["jaxpr"].jaxpr
    return all(_is_cheap(e) for e in inner.eqns)
  return False


def _dot_flops_per_output(eqn) -> float:
  (lc, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval
  return 2.0 * float(np.prod([lhs.shape[i] for i in lc], dtype=np.int64))


@dataclasses.dataclass(frozen=True, eq=False)
class Recompute:
  """How to rebuild a layer input from values the backward pass keeps anyway.

  ``rebuild(roots)`` replays the chain of cheap operations that produced the
  input in the forward pass.
  """

  roots: tuple[Any, ...]
  rebuild: Callable[[Sequence[Any]], Any]


def _nbytes(aval) -> int:
  shape = getattr(aval, "shape", ())
  dtype = getattr(aval, "dtype", None)
  itemsize = getattr(dtype, "itemsize", 4) if dtype is not None else 4
  return int(np.prod(shape, dtype=np.int64)) * int(itemsize)


class Analysis:
  """Static facts about one jaxpr evaluated by the interpreter.

  ``kernel_in`` and ``hot_in`` flag the jaxpr's inputs (constvars, then invars)
  that are LoRA kernels and that carry tangents (kernels are hot); ``structural``
  are the primitives through which a kernel stays a kernel (transpose, cast...).
  """

  def __init__(self, jaxpr, kernel_in: Sequence[bool], hot_in: Sequence[bool], structural: frozenset):
    self.jaxpr = jaxpr
    self.producer: dict = {}
    self.uses: dict = {}
    self.kernel: set = set()
    self.hot: set = set()
    self.inputs = set(jaxpr.invars) | set(jaxpr.constvars)
    for var, k, h in zip([*jaxpr.constvars, *jaxpr.invars], kernel_in, hot_in):
      if k:
        self.kernel.add(var)
      if h or k:
        self.hot.add(var)
    for index, eqn in enumerate(jaxpr.eqns):
      ins = [v for v in eqn.invars if not isinstance(v, jcore.Literal)]
      for pos, v in enumerate(eqn.invars):
        if not isinstance(v, jcore.Literal):
          self.uses.setdefault(v, []).append((eqn, pos))
      for v in eqn.outvars:
        self.producer[v] = (index, eqn)
      if any(v in self.hot for v in ins):
        self.hot.update(eqn.outvars)
      # A kernel value keeps being one through structural ops on it (scalar scaling too).
      if eqn.primitive in structural and any(v in self.kernel for v in ins):
        self.kernel.update(eqn.outvars)
    self.outputs = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}

  def _hot(self, v) -> bool:
    return not isinstance(v, jcore.Literal) and v in self.hot

  def kept_by_floor(self, var) -> bool:
    """Whether the backward pass of the model without adapters needs ``var`` anyway."""
    if var in self.outputs:
      return True
    for eqn, pos in self.uses.get(var, ()):
      prim = eqn.primitive
      if prim in _LINEAR:
        continue
      others = [v for i, v in enumerate(eqn.invars) if i != pos]
      if prim in _BILINEAR:
        if any(not isinstance(o, jcore.Literal) and o in self.kernel for o in others):
          continue  # a LoRA consumer: rebuilt by this mechanism
        if any(self._hot(o) for o in others) or (var in others and var in self.hot):
          return True
        continue
      if prim is P.div_p:
        if pos == 0 and self._hot(eqn.invars[1]):
          return True
        if pos == 1 and (self._hot(eqn.invars[0]) or var in self.hot):
          return True
        continue
      if var in self.hot:
        return True
    return False

  def recompute(self, x_var, env: dict, bind: Callable, *, rank: int) -> Recompute | None:
    """A ``Recompute`` for the layer input ``x_var``, or ``None`` when saving it is as good.

    ``env`` maps the jaxpr's variables to their values so far; ``bind(eqn, invals)``
    evaluates one equation (a list of outputs); ``rank`` is the adapter's rank (one
    contraction may be redone if it costs at most ``DOT_BUDGET`` times the adapter).
    """
    if isinstance(x_var, jcore.Literal) or x_var in self.inputs or x_var not in self.producer:
      return None
    if self.kept_by_floor(x_var):
      return None
    chain: dict = {}
    roots: list = []
    seen: set = set()
    dots = 0
    stack = [x_var]
    while stack:
      v = stack.pop()
      if v in seen:
        continue
      seen.add(v)
      item = self.producer.get(v)
      stop = (v in self.inputs or item is None or len(item[1].outvars) != 1
              or (v is not x_var and self.kept_by_floor(v)) or len(chain) >= MAX_CHAIN)
      if not stop and not _is_cheap(item[1]):
        eqn = item[1]
        affordable = (eqn.primitive is P.dot_general_p and not dots
                      and _dot_flops_per_output(eqn) <= DOT_BUDGET * 12 * rank)
        stop = not affordable
        dots += int(affordable)
      if stop:
        roots.append(v)
        continue
      index, eqn = item
      chain[index] = (index, eqn)
      stack.extend(u for u in eqn.invars if not isinstance(u, jcore.Literal))
    if not chain:
      return None
    # Roots the floor does not keep would be saved for us: only worth it when smaller than x.
    extra = sum(_nbytes(r.aval) for r in roots
                if r not in self.inputs and not self.kept_by_floor(r))
    if extra >= _nbytes(x_var.aval):
      return None
    vals = [env.get(r) for r in roots]
    if any(not _is_array(val) for val in vals):
      return None
    eqns = [eqn for _, (_, eqn) in sorted(chain.items())]
    order = tuple(roots)

    def rebuild(root_vals: Sequence[Any]):
      local = dict(zip(order, root_vals))
      read = lambda u: u.val if isinstance(u, jcore.Literal) else local[u]
      for eqn in eqns:
        (out,) = bind(eqn, [read(u) for u in eqn.invars])
        local[eqn.outvars[0]] = out
      return local[x_var]

    return Recompute(tuple(vals), rebuild)


def _is_array(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and not hasattr(x, "labels")
