"""The evaluator: re-runs a traced function's jaxpr with ``LowRank`` values in place of LoRA kernels.

Equations that do not touch a LoRA kernel are re-bound unchanged. Equations
that do are handled by a rule from the rule table (``jlora._apply.rules``):
structural ops (transpose, reshape, cast, slice...) update the ``LowRank``
value (``rules_structural``); consumers (``dot_general``,
``conv_general_dilated``, ``gather``) add the low-rank path to the base result
(``rules_consumers``); control flow (``jit``, ``remat``, ``scan``, ``cond``,
``while``) recurses into its body (``rules_control``). Anything else is an
error unless the user opted into merging that use on the fly.

The evaluator also serves adapted matmuls that read one input (q/k/v, gate/up)
together (``Interpreter._group``), and it is the ``ctx`` the consumer rules
receive (``jlora._apply.context.ConsumerContext``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
from jax.extend import core as jcore
from jax.extend.core import primitives as P

# The rule modules fill the rule table when imported.
from jlora._apply import rows, rules_consumers, rules_control, rules_structural  # noqa: F401
from jlora._apply.base_result import base_out
from jlora._apply.consumers.custom_vjp import groupable, grouped_dot_out
from jlora._apply.consumers.plans import dot_plan
from jlora._apply.equations import bind, source_context, where
from jlora._apply.lowrank import LowRank
from jlora._apply.recompute import Analysis, Recompute
from jlora._apply.rules import RULES, STRUCTURAL, is_lowrank
from jlora._errors import LoraApplyError, OrientationError, Unsupported

OnUnsupported = Literal["error", "merge"]


def _group_input(eqn, kernel, producer=None):
  """The input a matmul of one LoRA kernel reads, or ``None`` (for another kind of matmul).

  With ``producer``, a key under which matmuls reading the same value meet: the input
  followed back through casts (each layer may cast its input itself), with the casts' dtypes.
  """
  lhs, rhs = eqn.invars
  k = [not isinstance(u, jcore.Literal) and u in kernel for u in (lhs, rhs)]
  if k[0] == k[1]:
    return None
  x = rhs if k[0] else lhs
  if isinstance(x, jcore.Literal):
    return None
  if producer is None:
    return x
  casts = []
  while x in producer and producer[x][1].primitive is P.convert_element_type_p:
    casts.append(x.aval.dtype)
    x = producer[x][1].invars[0]
    if isinstance(x, jcore.Literal):
      return None
  return (x, tuple(casts))


class _Frame:
  """One jaxpr being evaluated: its environment and, on demand, its static analysis.

  A body inlined from a ``jit`` knows its caller (``parent``, and the caller's operands
  ``outer`` for its inputs), so that the rows of a value can be followed across it
  (``jlora._apply.rows``).
  """

  __slots__ = ("jaxpr", "env", "args", "hot_in", "_analysis", "parent", "outer")

  def __init__(self, jaxpr, env, args, hot_in, parent=None, outer=None):
    self.jaxpr, self.env, self.args, self.hot_in = jaxpr, env, args, hot_in
    self.parent, self.outer = parent, outer
    self._analysis = None

  def scope(self) -> rows.Scope:
    """This jaxpr (and its callers) for ``rows.trace_rows``."""
    parent = None
    if self.parent is not None and self.outer is not None:
      parent = (self.parent.scope(), [None] * len(self.jaxpr.constvars) + list(self.outer))
    env = self.env
    return rows.Scope(self.jaxpr, lambda v: env[v], parent)

  def groups(self) -> dict[int, list[int]]:
    """Matmuls of LoRA kernels that read one input, by the index of the first (see ``_group_input``)."""
    if not any(is_lowrank(a) for a in self.args):
      return {}
    analysis = self.analysis()
    by_input: dict = {}
    for index, eqn in enumerate(self.jaxpr.eqns):
      if eqn.primitive is P.dot_general_p:
        key = _group_input(eqn, analysis.kernel, analysis.producer)
        if key is not None:
          by_input.setdefault(key, []).append(index)
    return {m[0]: m for m in by_input.values() if len(m) > 1}

  def analysis(self) -> Analysis:
    if self._analysis is None:
      kernel_in = [is_lowrank(a) for a in self.args]
      hot_in = self.hot_in if self.hot_in is not None else [False] * len(self.args)
      self._analysis = Analysis(self.jaxpr, kernel_in, hot_in, STRUCTURAL)
    return self._analysis


class Interpreter:
  """Evaluates jaxprs, replacing LoRA kernel uses by their low-rank path.

  ``mode="lora"`` computes; ``mode="probe"`` records how each kernel is used
  (for ``jlora.infer_layout``) and computes only the base. It is the ``ctx`` of
  the consumer rules: ``custom_vjp``, ``fused_expansion``, ``context`` and
  ``next_key()`` are its side of ``jlora._apply.context.ConsumerContext``.
  """

  def __init__(self, *, mode: str, on_unsupported: OnUnsupported, rng, usages: dict,
               fused_expansion: bool = False, custom_vjp: bool = False, context: dict | None = None):
    self.mode = mode
    self.on_unsupported = on_unsupported
    self.rng = rng
    self.usages = usages
    # The custom-VJP lowering of the consumers (``consumers.custom_vjp``) and, within it or
    # alone, rank expansions as fused multiply-adds.
    self.custom_vjp = custom_vjp
    self.fused_expansion = fused_expansion
    # Per-call inputs for variants, e.g. ``adapter_ids`` for a bank of adapters.
    self.context = {} if context is None else context
    self._sites = 0
    self._frame: _Frame | None = None

  def child(self, rng) -> "Interpreter":
    return Interpreter(mode=self.mode, on_unsupported=self.on_unsupported, rng=rng,
                       usages=self.usages, fused_expansion=self.fused_expansion,
                       custom_vjp=self.custom_vjp, context=self.context)

  def next_key(self) -> jax.Array | None:
    """The dropout key of the next use site (``None`` without ``lora_rng``)."""
    if self.rng is None:
      return None
    self._sites += 1
    return jax.random.fold_in(self.rng, self._sites)

  def record(self, v: LowRank, usage: dict) -> None:
    self.usages.setdefault(v.path, []).append(usage)

  # -- static facts about the jaxpr being evaluated (for the consumers) --------------
  def hot(self, invars) -> list[bool]:
    """Whether each of ``invars`` (of the current jaxpr) depends on a LoRA kernel."""
    hot = self._frame.analysis().hot
    return [not isinstance(v, jcore.Literal) and v in hot for v in invars]

  def recompute(self, var, *, rank: int) -> Recompute | None:
    """How to rebuild the layer input ``var`` in the backward pass (``jlora._apply.recompute``)."""
    if self._frame is None or self.mode != "lora":
      return None
    return self._frame.analysis().recompute(var, self._frame.env, bind, rank=rank)

  def trace_rows(self, var, ids):
    """``ids`` (of the model inputs' leading shape) at every element of ``var`` of the current jaxpr,
    following its rows back through data movement (``jlora._apply.rows``); ``None`` if they cannot be."""
    return rows.trace_rows(self._frame.scope(), var, ids)

  # -- evaluation -----------------------------------------------------------------
  def run(self, jaxpr, consts: Sequence[Any], args: Sequence[Any], hot: Sequence[bool] | None = None,
          outer: Sequence[Any] | None = None) -> list:
    """Evaluates ``jaxpr``; ``hot`` flags the inputs that carry tangents (LoRA kernels always do);
    ``outer``: for a body inlined from an equation of the current jaxpr, that equation's operands."""
    env: dict = {}
    frame, self._frame = self._frame, _Frame(jaxpr, env, list(consts) + list(args),
                                              None if hot is None else [False] * len(consts) + list(hot),
                                              parent=self._frame if outer is not None else None, outer=outer)
    try:
      return self._run(jaxpr, consts, args, env)
    finally:
      self._frame = frame

  def _run(self, jaxpr, consts, args, env) -> list:
    def read(v):
      return v.val if isinstance(v, jcore.Literal) else env[v]

    for var, val in zip(jaxpr.constvars, consts):
      env[var] = val
    for var, val in zip(jaxpr.invars, args):
      env[var] = val
    groups = self._frame.groups() if self.mode == "lora" and self.custom_vjp else {}
    ready: dict[int, list] = {}  # equations evaluated ahead of their turn (groups)
    for index, eqn in enumerate(jaxpr.eqns):
      if index in ready:
        outs = ready.pop(index)
      elif index in groups and (outs := self._group(index, groups[index], env, ready)) is not None:
        pass
      else:
        outs = self._eval(eqn, [read(v) for v in eqn.invars])
      for var, val in zip(eqn.outvars, outs):
        if not isinstance(var, jcore.DropVar):
          env[var] = val
    return [read(v) for v in jaxpr.outvars]

  def _eval(self, eqn, invals) -> list:
    if not any(is_lowrank(x) for x in invals):
      return bind(eqn, invals)
    rule = RULES.get(eqn.primitive)
    try:
      if rule is None:
        raise Unsupported("")
      with source_context(eqn):
        return rule(self, eqn, invals)
    except Unsupported as e:
      return self.unsupported(eqn, invals, str(e))
    except OrientationError as e:
      raise LoraApplyError(f"jlora.wrap: {e}{where(eqn)}") from None

  # -- adapted matmuls that read one input (q/k/v, gate/up) ----------------------------
  def _group(self, index: int, members: list[int], env: dict, ready: dict) -> list | None:
    """Serves the matmuls ``members`` (equation indices, ``index`` first) under one custom VJP.

    Their kernels are evaluated ahead of their turn when they can be (the structural
    equations between a kernel input and its matmul); the other members' outputs go to
    ``ready``. Returns ``index``'s outputs, or ``None`` to serve ``index`` alone.
    """
    jaxpr = self._frame.jaxpr
    eqns = jaxpr.eqns
    kernel = self._frame.analysis().kernel
    x_var = _group_input(eqns[index], kernel)
    x = env.get(x_var)
    if x is None or is_lowrank(x):
      return None
    chosen, vs, plans = [], [], []
    for m in members:
      eqn = eqns[m]
      v_is_lhs = not isinstance(eqn.invars[0], jcore.Literal) and eqn.invars[0] in kernel
      kvar = eqn.invars[0] if v_is_lhs else eqn.invars[1]
      if not self._ahead(kvar, env, ready, index):
        continue
      v = env[kvar]
      if not is_lowrank(v) or not v.has_factors:
        continue
      try:
        plan = dot_plan(v, x, v_is_lhs=v_is_lhs, dimension_numbers=eqn.params["dimension_numbers"],
                                   precision=eqn.params["precision"], out_dtype=eqn.outvars[0].aval.dtype)
      except OrientationError:
        continue  # raised with its source line when the equation is served alone
      if groupable(v, plan):
        chosen.append(m)
        vs.append(v)
        plans.append(plan)
    if len(chosen) < 2 or chosen[0] != index:
      return None
    bases = []
    for m, v, plan in zip(chosen, vs, plans):
      # The other members' inputs hold the same value (the same casts of one value).
      with source_context(eqns[m]):
        bases.append(base_out(eqns[m], [v, x] if plan.v_is_lhs else [x, v])[0])
    recompute = self.recompute(x_var, rank=sum(v.source.spec.rank for v in vs))
    with source_context(eqns[index]):
      outs = grouped_dot_out(self, vs, x, bases, plans, recompute=recompute)
    if outs is None:
      return None
    for m, out in zip(chosen[1:], outs[1:]):
      ready[m] = [out]
    return [outs[0]]

  def _ahead(self, var, env: dict, ready: dict, now: int) -> bool:
    """Makes the kernel value ``var`` available now, evaluating its structural equations early."""
    if isinstance(var, jcore.Literal) or var in env:
      return True
    an = self._frame.analysis()
    item = an.producer.get(var)
    if item is None or var not in an.kernel:
      return False
    index, eqn = item
    if index < now or index in ready:
      return False
    for u in eqn.invars:
      if isinstance(u, jcore.Literal) or u in env:
        continue
      if u not in an.kernel or not self._ahead(u, env, ready, now):
        return False
    outs = self._eval(eqn, [u.val if isinstance(u, jcore.Literal) else env[u] for u in eqn.invars])
    for o, val in zip(eqn.outvars, outs):
      if not isinstance(o, jcore.DropVar):
        env[o] = val
    ready[index] = outs
    return True

  def unsupported(self, eqn, invals, reason: str) -> list:
    lrs = [x for x in invals if is_lowrank(x)]
    if self.mode == "probe":
      for v in lrs:
        self.record(v, {"kind": "other", "primitive": eqn.primitive.name})
      return bind(eqn, [x.base if is_lowrank(x) else x for x in invals])
    if self.on_unsupported == "merge" or all(not x.has_factors for x in lrs):
      # An opted-in merge, or a frozen lazy (e.g. 4-bit) kernel without adapter: decode it here.
      return bind(eqn, [x.dense() if is_lowrank(x) else x for x in invals])
    paths = ", ".join(repr(v.path) for v in lrs)
    why = f": {reason}" if reason else ""
    raise LoraApplyError(
        f"jlora.wrap: the LoRA kernel {paths} reaches `{eqn.primitive.name}`{where(eqn)}, which "
        f"the low-rank path cannot serve{why}. Either exclude this parameter from the LoRA "
        "targets (LoraConfig(exclude=...)), or opt into building the dense W0 + scale·B·A for "
        "this use with jlora.wrap(fn, on_unsupported='merge')."
    )

  def finish(self, outs: list) -> list:
    """Top-level outputs must be plain arrays."""
    result = []
    for x in outs:
      if is_lowrank(x):
        if self.mode == "probe":
          x = x.base
        elif self.on_unsupported == "merge" or not x.has_factors:
          x = x.dense()
        else:
          raise LoraApplyError(
              f"jlora.wrap: the wrapped function returns the LoRA kernel {x.path!r} itself; the "
              "low-rank path only serves uses of a kernel. Return something computed from it, "
              "or pass on_unsupported='merge' to return the merged kernel."
          )
      result.append(x)
    return result
