"""Control-flow rules: ``jit``, ``remat``, ``scan``, ``cond`` and ``while`` interpret their bodies.

A nested ``jit`` is inlined; ``remat`` is re-wrapped in ``jax.checkpoint`` with
the same policy; under ``scan`` a stacked kernel becomes scanned factors (each
iteration sees one layer's ``LowRank`` value, a lazy base split along its
stacked axis); ``cond`` and ``while`` run their branches and bodies through the
interpreter. Each body gets its own dropout key (one per ``scan`` iteration).
"""

from __future__ import annotations

import jax
from jax import lax
from jax.extend import core as jcore
from jax.extend.core import primitives as P

from jlora._apply.rules import is_lowrank, rule
from jlora._errors import Unsupported


def _closed(j):
  if isinstance(j, jcore.ClosedJaxpr):
    return j.jaxpr, j.consts
  return j, ()


@rule(P.jit_p, P.closed_call_p)
def _inline(interp, eqn, invals):
  jaxpr, consts = _closed(eqn.params.get("jaxpr", eqn.params.get("call_jaxpr")))
  return interp.run(jaxpr, consts, invals, hot=interp.hot(eqn.invars), outer=eqn.invars)


@rule(P.remat_p)
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
  any_hot = any(hot) or any(is_lowrank(x) for x in invals)
  return [*hot[:nconst], *([any_hot] * ncarry), *hot[nconst + ncarry:]]


@rule(P.scan_p)
def _scan(interp, eqn, invals):
  p = eqn.params
  nconst, ncarry = p["num_consts"], p["num_carry"]
  consts = invals[:nconst]
  init = invals[nconst:nconst + ncarry]
  xs = invals[nconst + ncarry:]
  if any(is_lowrank(c) for c in init):
    raise Unsupported("a LoRA kernel in a scan carry")
  jaxpr, jconsts = _closed(p["jaxpr"])
  packed, rebuild = [], []
  for x in xs:
    if is_lowrank(x):
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


@rule(P.cond_p)
def _cond(interp, eqn, invals):
  index, ops = invals[0], list(invals[1:])
  if is_lowrank(index):
    raise Unsupported("")
  key = interp.next_key()
  hot = interp.hot(eqn.invars[1:])

  def branch(closed):
    jaxpr, consts = _closed(closed)
    return lambda ops, k: interp.child(k).run(jaxpr, consts, ops, hot=hot)

  return lax.switch(index, [branch(b) for b in eqn.params["branches"]], ops, key)


@rule(P.while_p)
def _while(interp, eqn, invals):
  p = eqn.params
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts, init = invals[:nc], invals[nc:nc + nb], list(invals[nc + nb:])
  if any(is_lowrank(x) for x in init):
    raise Unsupported("a LoRA kernel in a while-loop carry")
  cj, cc = _closed(p["cond_jaxpr"])
  bj, bc = _closed(p["body_jaxpr"])
  key = interp.next_key()
  hot = interp.hot(eqn.invars)
  carry_hot = [any(hot) or any(is_lowrank(x) for x in invals)] * len(init)
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
