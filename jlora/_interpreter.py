"""A jaxpr interpreter that evaluates a traced function with ``LowRank`` kernels.

Equations that do not touch a LoRA kernel are re-bound unchanged. Equations
that do are handled by a rule: structural ops (transpose, reshape, cast,
slice...) update the ``LowRank`` value; consumers (``dot_general``,
``conv_general_dilated``, ``gather``) add the low-rank path to the base
result; control flow (``jit``, ``remat``, ``scan``, ``cond``, ``while``)
recurses into its body. Anything else is an error unless the user opted into
merging that use on the fly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore
from jax.extend.core import primitives as P

from jlora import _consumers, _lowrank
from jlora._consumers import OrientationError
from jlora._lazy import LazyBase
from jlora._lowrank import LowRank, Unsupported
from jlora._recompute import Analysis, Recompute

try:  # source locations in error messages and profiles; private, so optional
  from jax._src import source_info_util as _siu
except Exception:  # pragma: no cover
  _siu = None

OnUnsupported = Literal["error", "merge"]


class LoraApplyError(ValueError):
  """The wrapped function used a LoRA kernel in a way the low-rank path cannot serve."""


def _where(eqn) -> str:
  if _siu is None:
    return ""
  try:
    s = _siu.summarize(eqn.source_info)
    return f" (at {s})" if s and "unknown" not in s else ""
  except Exception:  # pragma: no cover
    return ""


def _ctx(eqn):
  if _siu is None:
    return contextlib.nullcontext()
  stack = contextlib.ExitStack()
  try:
    name_stack = _siu.current_name_stack() + eqn.source_info.name_stack
    stack.enter_context(_siu.user_context(eqn.source_info.traceback, name_stack=name_stack))
  except Exception:  # pragma: no cover
    pass
  stack.enter_context(eqn.ctx.manager)
  return stack


def _bind(eqn, invals, *, ctx: bool = True) -> list:
  params = eqn.primitive.get_bind_params(eqn.params)
  with _ctx(eqn) if ctx else contextlib.nullcontext():
    out = eqn.primitive.bind(*invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _is_lr(x) -> bool:
  return isinstance(x, LowRank)


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
  """One jaxpr being evaluated: its environment and, on demand, its static analysis."""

  __slots__ = ("jaxpr", "env", "args", "hot_in", "_analysis")

  def __init__(self, jaxpr, env, args, hot_in):
    self.jaxpr, self.env, self.args, self.hot_in = jaxpr, env, args, hot_in
    self._analysis = None

  def groups(self) -> dict[int, list[int]]:
    """Matmuls of LoRA kernels that read one input, by the index of the first (see ``_group_input``)."""
    if not any(_is_lr(a) for a in self.args):
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
      kernel_in = [_is_lr(a) for a in self.args]
      hot_in = self.hot_in if self.hot_in is not None else [False] * len(self.args)
      self._analysis = Analysis(self.jaxpr, kernel_in, hot_in, _STRUCTURAL)
    return self._analysis


class Interpreter:
  """Evaluates jaxprs, replacing LoRA kernel uses by their low-rank path.

  ``mode="lora"`` computes; ``mode="probe"`` records how each kernel is used
  (for ``jlora.infer_layout``) and computes only the base.
  """

  def __init__(self, *, mode: str, on_unsupported: OnUnsupported, rng, usages: dict,
               fused_expansion: bool = False, custom_vjp: bool = False, context: dict | None = None):
    self.mode = mode
    self.on_unsupported = on_unsupported
    self.rng = rng
    self.usages = usages
    # The custom-VJP lowering of the consumers (``_consumers.lowrank_term``) and, within
    # it or alone, rank expansions as fused multiply-adds.
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

  def next_key(self):
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
    """How to rebuild the layer input ``var`` in the backward pass (``jlora._recompute``)."""
    if self._frame is None or self.mode != "lora":
      return None
    return self._frame.analysis().recompute(var, self._frame.env, _bind, rank=rank)

  # -- evaluation -----------------------------------------------------------------
  def run(self, jaxpr, consts: Sequence[Any], args: Sequence[Any], hot: Sequence[bool] | None = None) -> list:
    """Evaluates ``jaxpr``; ``hot`` flags the inputs that carry tangents (LoRA kernels always do)."""
    env: dict = {}
    frame, self._frame = self._frame, _Frame(jaxpr, env, list(consts) + list(args),
                                              None if hot is None else [False] * len(consts) + list(hot))
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
    if not any(_is_lr(x) for x in invals):
      return _bind(eqn, invals)
    rule = _RULES.get(eqn.primitive)
    try:
      if rule is None:
        raise Unsupported("")
      with _ctx(eqn):
        return rule(self, eqn, invals)
    except Unsupported as e:
      return self.unsupported(eqn, invals, str(e))
    except OrientationError as e:
      raise LoraApplyError(f"jlora.wrap: {e}{_where(eqn)}") from None

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
    if x is None or _is_lr(x):
      return None
    chosen, vs, plans = [], [], []
    for m in members:
      eqn = eqns[m]
      v_is_lhs = not isinstance(eqn.invars[0], jcore.Literal) and eqn.invars[0] in kernel
      kvar = eqn.invars[0] if v_is_lhs else eqn.invars[1]
      if not self._ahead(kvar, env, ready, index):
        continue
      v = env[kvar]
      if not _is_lr(v) or not v.has_factors:
        continue
      try:
        plan = _consumers.dot_plan(v, x, v_is_lhs=v_is_lhs, dimension_numbers=eqn.params["dimension_numbers"],
                                   precision=eqn.params["precision"], out_dtype=eqn.outvars[0].aval.dtype)
      except OrientationError:
        continue  # raised with its source line when the equation is served alone
      if _consumers.groupable(v, plan):
        chosen.append(m)
        vs.append(v)
        plans.append(plan)
    if len(chosen) < 2 or chosen[0] != index:
      return None
    bases = []
    for m, v, plan in zip(chosen, vs, plans):
      # The other members' inputs hold the same value (the same casts of one value).
      with _ctx(eqns[m]):
        bases.append(_base_out(eqns[m], [v, x] if plan.v_is_lhs else [x, v])[0])
    recompute = self.recompute(x_var, rank=sum(v.source.spec.rank for v in vs))
    with _ctx(eqns[index]):
      outs = _consumers.grouped_dot_out(self, vs, x, bases, plans, recompute=recompute)
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
    lrs = [x for x in invals if _is_lr(x)]
    if self.mode == "probe":
      for v in lrs:
        self.record(v, {"kind": "other", "primitive": eqn.primitive.name})
      return _bind(eqn, [x.base if _is_lr(x) else x for x in invals])
    if self.on_unsupported == "merge" or all(not x.has_factors for x in lrs):
      # An opted-in merge, or a frozen lazy (e.g. 4-bit) kernel without adapter: decode it here.
      return _bind(eqn, [x.dense() if _is_lr(x) else x for x in invals])
    paths = ", ".join(repr(v.path) for v in lrs)
    why = f": {reason}" if reason else ""
    raise LoraApplyError(
        f"jlora.wrap: the LoRA kernel {paths} reaches `{eqn.primitive.name}`{_where(eqn)}, which "
        f"the low-rank path cannot serve{why}. Either exclude this parameter from the LoRA "
        "targets (LoraConfig(exclude=...)), or opt into building the dense W0 + scale·B·A for "
        "this use with jlora.wrap(fn, on_unsupported='merge')."
    )

  def finish(self, outs: list) -> list:
    """Top-level outputs must be plain arrays."""
    result = []
    for x in outs:
      if _is_lr(x):
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


# -----------------------------------------------------------------------------
# Rules
# -----------------------------------------------------------------------------

_RULES: dict[Any, Callable] = {}
# Primitives through which a LoRA kernel stays a kernel (filled by ``_structural``; scalar scaling).
_STRUCTURAL: set = {P.mul_p, P.div_p}


def _rule(*prims):
  def deco(fn):
    for p in prims:
      _RULES[p] = fn
    return fn

  return deco


def _single(invals) -> tuple[LowRank, list]:
  lrs = [i for i, x in enumerate(invals) if _is_lr(x)]
  if len(lrs) != 1 or lrs[0] != 0:
    raise Unsupported("")
  return invals[0], invals[1:]


def _base_out(eqn, invals):
  """The equation's result on the bases (rules run inside the equation's source context).

  A lazy base (a kernel stored in another form, ``jlora._lazy``) is decoded inside the
  consumer and decoded again for the backward pass, never kept as a residual (see
  ``_lazy_consumer``).
  """
  bases = [x.base if _is_lr(x) else x for x in invals]
  lazy = [i for i, b in enumerate(bases) if isinstance(b, LazyBase)]
  if not lazy:
    return _bind(eqn, bases, ctx=False)
  others = [None if i in lazy else b for i, b in enumerate(bases)]
  return _lazy_consumer(eqn, tuple(lazy))([bases[i] for i in lazy], others)


def _lazy_consumer(eqn, lazy: tuple[int, ...]):
  """``f(lazies, others)``: decode the lazy operands, bind ``eqn``; under a custom VJP.

  The residuals are the stored form and the other operands; the backward pass decodes
  again. (``jax.checkpoint`` would express the same, but XLA's CPU pipeline merges the
  recomputation with the forward decode by common-subexpression elimination, and schedules
  every layer's decode at the start, keeping all dense kernels alive at once. Here each decode
  reads its stored arrays through a data dependency on the layer input (forward) or the
  cotangent (backward), so it runs where it is used and cannot be merged.) Forward-mode
  differentiation (``jax.jvp``) does not pass a custom VJP.
  """

  def apply(lazies, others):
    full = list(others)
    for i, lz in zip(lazy, lazies):
      full[i] = lz.materialize()
    return _bind(eqn, full, ctx=False)

  def forward(lazies, others):
    # Decode once the other operands (the layer input) exist: XLA would otherwise schedule every
    # layer's decode at the start of the program and keep all dense kernels alive at once.
    return apply(_tie(lazies, others), others)

  f = jax.custom_vjp(forward)

  def fwd(lazies, others):
    return forward(lazies, others), (lazies, others)

  def bwd(res, g):
    lazies, others = res
    lazies = _tie(lazies, g)
    _, vjp = jax.vjp(lambda o: apply(lazies, o), others)
    return _zero_cotangent(lazies), vjp(g)[0]

  f.defvjp(fwd, bwd)
  return f


def _tie(tree, g):
  """``tree`` unchanged in value but data-dependent on ``g`` (a flag that is set only when the
  first element of ``g``'s first floating array is NaN, which XLA cannot fold away)."""
  first = [jnp.ravel(x)[0] for x in jax.tree.leaves(g)
           if hasattr(x, "dtype") and jnp.size(x) and jnp.issubdtype(x.dtype, jnp.floating)]
  if not first:
    return tree
  flag = first[0] != first[0]

  def tie(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.integer):
      return x ^ flag.astype(x.dtype)
    if jnp.issubdtype(x.dtype, jnp.floating):
      return x + jnp.where(flag, first[0], 0).astype(x.dtype)
    return x

  return jax.tree.map(tie, tree)


def _zero_cotangent(tree):
  def zero(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
      return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)

  return jax.tree.map(zero, tree)


def _structural(*prims):
  """A rule for ops whose first operand is the LoRA kernel: the op runs on the base, then
  ``update(v, eqn, out, rest)`` relabels / reshapes the factors (the other operands ``rest``
  must not be LoRA kernels). A lazy base records the op instead of running it."""

  def deco(update):
    def rule(interp, eqn, invals):
      v, rest = _single(invals)
      if any(_is_lr(x) for x in rest):
        raise Unsupported("")
      if isinstance(v.base, LazyBase):
        out = v.base.record(eqn.primitive, eqn.params, rest)
      else:
        outs = _base_out(eqn, invals)
        if len(outs) != 1:
          raise Unsupported("")
        out = outs[0]
      return [update(v, eqn, out, rest)]

    _STRUCTURAL.update(prims)
    return _rule(*prims)(rule)

  return deco


@_structural(P.convert_element_type_p, P.copy_p, P.reduce_precision_p, P.sharding_constraint_p,
             P.device_put_p)
def _passthrough(v, eqn, out, rest):
  return v.with_base(out)


@_structural(P.transpose_p)
def _transpose(v, eqn, out, rest):
  return v.transpose(eqn.params["permutation"], out)


@_structural(P.squeeze_p)
def _squeeze(v, eqn, out, rest):
  return v.reshape(out.shape, out)


@_structural(P.reshape_p)
def _reshape(v, eqn, out, rest):
  if rest or eqn.params.get("dimensions") is not None:
    raise Unsupported("a reshape with dynamic shapes or a dimension permutation")
  return v.reshape(out.shape, out)


@_structural(P.broadcast_in_dim_p)
def _broadcast(v, eqn, out, rest):
  if rest or not _lowrank.is_unit_broadcast(v.base.shape, out.shape, eqn.params["broadcast_dimensions"]):
    raise Unsupported("a broadcast that tiles the kernel")
  return v.reshape(out.shape, out)


@_structural(P.slice_p)
def _slice(v, eqn, out, rest):
  p = eqn.params
  strides = p["strides"] or (1,) * len(p["start_indices"])
  slices = {}
  for ax, (s, e, st) in enumerate(zip(p["start_indices"], p["limit_indices"], strides)):
    if (s, e, st) != (0, v.base.shape[ax], 1):
      slices[ax] = (s, out.shape[ax], st)
  return v.slice_axes(slices, out, dynamic=False)


@_structural(P.dynamic_slice_p)
def _dynamic_slice(v, eqn, out, starts):
  sizes = eqn.params["slice_sizes"]
  slices = {ax: (starts[ax], sizes[ax], 1) for ax in range(len(sizes)) if sizes[ax] != v.base.shape[ax]}
  return v.slice_axes(slices, out, dynamic=True)


@_structural(P.neg_p)
def _neg(v, eqn, out, rest):
  return v.scale_by(-1.0, out)


@_structural(P.stop_gradient_p)
def _stop_gradient(v, eqn, out, rest):
  return v.map_factors(lax.stop_gradient, out)


@_rule(P.mul_p, P.div_p)
def _scalar_mul(interp, eqn, invals):
  x, y = invals
  if _is_lr(x) and not _is_lr(y):
    v, c = x, y
  elif _is_lr(y) and not _is_lr(x) and eqn.primitive is P.mul_p:
    v, c = y, x
  else:
    raise Unsupported("")
  if jnp.ndim(c) != 0:
    raise Unsupported("an elementwise product with a non-scalar")
  if isinstance(v.base, LazyBase):  # kernel*c, c*kernel or kernel/c: replayed as (kernel, c)
    out = v.base.record(eqn.primitive, eqn.params, [c])
  else:
    (out,) = _base_out(eqn, invals)
  factor = c if eqn.primitive is P.mul_p else 1.0 / jnp.asarray(c, jnp.float32)
  return [v.scale_by(factor, out)]


@_rule(P.dot_general_p)
def _dot_general(interp, eqn, invals):
  lhs, rhs = invals
  if _is_lr(lhs) and _is_lr(rhs):
    raise Unsupported("a product of two LoRA kernels")
  (out,) = _base_out(eqn, invals)
  v_is_lhs = _is_lr(lhs)
  v, x = (lhs, rhs) if v_is_lhs else (rhs, lhs)
  dn = eqn.params["dimension_numbers"]
  if interp.mode == "probe":
    (lc, rc), (lb, rb) = dn
    vc, vb = (lc, lb) if v_is_lhs else (rc, rb)
    interp.record(v, {
        "kind": "dot",
        "in": _lowrank.provenance(v.labels[i] for i in vc),
        "batch": tuple(sorted(set(_lowrank.provenance(v.labels[i] for i in vb)) | set(v.dropped))),
    })
    return [out]
  if not v.has_factors:
    return [out]
  x_var = eqn.invars[1] if v_is_lhs else eqn.invars[0]
  recompute = interp.recompute(x_var, rank=v.source.spec.rank) if interp.custom_vjp else None
  plan = _consumers.dot_plan(v, x, v_is_lhs=v_is_lhs, dimension_numbers=dn,
                             precision=eqn.params["precision"], out_dtype=out.dtype, recompute=recompute)
  return [v.source.spec.variant.dot(interp, v, x, out, plan)]


@_rule(P.conv_general_dilated_p)
def _conv(interp, eqn, invals):
  lhs, rhs = invals
  if _is_lr(lhs):
    raise Unsupported("a LoRA kernel used as the convolution input")
  (out,) = _base_out(eqn, invals)
  if interp.mode == "probe":
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec
    interp.record(rhs, {
        "kind": "conv",
        "in": _lowrank.provenance(l for i, l in enumerate(rhs.labels) if i != rhs_spec[0]),
        "batch": tuple(sorted(rhs.dropped)),
    })
    return [out]
  if not rhs.has_factors:
    return [out]
  return [rhs.source.spec.variant.conv(interp, rhs, lhs, out, eqn.params)]


@_rule(P.gather_p)
def _gather(interp, eqn, invals):
  v, (indices,) = _single(invals)
  (out,) = _base_out(eqn, invals)
  if interp.mode == "probe":
    dn = eqn.params["dimension_numbers"]
    interp.record(v, {
        "kind": "gather",
        "in": _lowrank.provenance(v.labels[d] for d in dn.start_index_map),
        "batch": tuple(sorted(v.dropped)),
    })
    return [out]
  if not v.has_factors:
    return [out]
  return [v.source.spec.variant.gather(interp, v, indices, out, eqn.params)]


# -- control flow ---------------------------------------------------------------------


def _closed(j):
  if isinstance(j, jcore.ClosedJaxpr):
    return j.jaxpr, j.consts
  return j, ()


@_rule(P.jit_p, P.closed_call_p)
def _inline(interp, eqn, invals):
  jaxpr, consts = _closed(eqn.params.get("jaxpr", eqn.params.get("call_jaxpr")))
  return interp.run(jaxpr, consts, invals, hot=interp.hot(eqn.invars))


@_rule(P.remat_p)
def _remat(interp, eqn, invals):
  p = eqn.params
  jaxpr, consts = _closed(p["jaxpr"])
  hot = interp.hot(eqn.invars)

  def body(vals, key):
    return interp.child(key).run(jaxpr, consts, vals, hot=hot)

  ck = jax.checkpoint(body, prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))
  return ck(list(invals), interp.next_key())


def _loop_hot(hot: list, invals, nconst: int, ncarry: int) -> list:
  """Hot flags of a loop body's inputs: a carry is hot if anything entering the loop is."""
  any_hot = any(hot) or any(_is_lr(x) for x in invals)
  return [*hot[:nconst], *([any_hot] * ncarry), *hot[nconst + ncarry:]]


@_rule(P.scan_p)
def _scan(interp, eqn, invals):
  p = eqn.params
  nconst, ncarry = p["num_consts"], p["num_carry"]
  consts = invals[:nconst]
  init = invals[nconst:nconst + ncarry]
  xs = invals[nconst + ncarry:]
  if any(_is_lr(c) for c in init):
    raise Unsupported("a LoRA kernel in a scan carry")
  jaxpr, jconsts = _closed(p["jaxpr"])
  packed, rebuild = [], []
  for x in xs:
    if _is_lr(x):
      children, fn = x.scan_split()
      packed.append(children)
      rebuild.append(fn)
    else:
      packed.append(x)
      rebuild.append(None)
  key = interp.next_key()
  keys = None if key is None else jax.random.split(key, p["length"])
  hot = _loop_hot(interp.hot(eqn.invars), invals, nconst, ncarry)

  def body(carry, inp):
    xs_in, k = inp
    xs_vals = [fn(x) if fn is not None else x for x, fn in zip(xs_in, rebuild)]
    outs = interp.child(k).run(jaxpr, jconsts, [*consts, *carry, *xs_vals], hot=hot)
    return outs[:ncarry], outs[ncarry:]

  carry, ys = lax.scan(body, list(init), (packed, keys), length=p["length"],
                       reverse=p["reverse"], unroll=p["unroll"])
  return [*carry, *ys]


@_rule(P.cond_p)
def _cond(interp, eqn, invals):
  index, ops = invals[0], list(invals[1:])
  if _is_lr(index):
    raise Unsupported("")
  key = interp.next_key()
  hot = interp.hot(eqn.invars[1:])

  def branch(closed):
    jaxpr, consts = _closed(closed)
    return lambda ops, k: interp.child(k).run(jaxpr, consts, ops, hot=hot)

  return lax.switch(index, [branch(b) for b in eqn.params["branches"]], ops, key)


@_rule(P.while_p)
def _while(interp, eqn, invals):
  p = eqn.params
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts, init = invals[:nc], invals[nc:nc + nb], list(invals[nc + nb:])
  if any(_is_lr(x) for x in init):
    raise Unsupported("a LoRA kernel in a while-loop carry")
  cj, cc = _closed(p["cond_jaxpr"])
  bj, bc = _closed(p["body_jaxpr"])
  key = interp.next_key()
  hot = interp.hot(eqn.invars)
  carry_hot = [any(hot) or any(_is_lr(x) for x in invals)] * len(init)
  cond_hot, body_hot = hot[:nc] + carry_hot, hot[nc:nc + nb] + carry_hot

  def cond_fn(state):
    carry, _ = state
    return interp.child(None).run(cj, cc, [*cconsts, *carry], hot=cond_hot)[0]

  def body_fn(state):
    carry, k = state
    k_here, k_next = (None, None) if k is None else tuple(jax.random.split(k))
    return interp.child(k_here).run(bj, bc, [*bconsts, *carry], hot=body_hot), k_next

  carry, _ = lax.while_loop(cond_fn, body_fn, (init, key))
  return list(carry)

