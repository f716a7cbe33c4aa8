"""Which example each row of a layer input belongs to, followed back through data movement.

A bank of adapters selects each example's slot from ``adapter_ids``, which have the
leading shape of the model's inputs (``(B,)`` or ``(B, T)``). A dense layer's input
keeps that shape, but a mixture of experts sorts its token rows by expert before the
grouped matmul (``ragged_dot``): the rows of ``x_sorted`` are a permutation (with
``top_k`` repeats) of the batch's tokens. ``trace_rows(scope, var, ids)`` walks back,
statically, from such an input to values whose leading axes are the batch's (the
*roots*), through operations that move rows without mixing them: gathers, reshapes,
transposes, slices, broadcasts, casts, elementwise arithmetic, the rows of a matmul's
or grouped matmul's input, and calls made of those (``jit``, custom derivatives). It
replays that chain on the ids (broadcast over each root), so it returns the id of
every element of the input: the same gathers with the model's own indices (read from
the forward pass's values), so each sorted row gets the id of the token it came from.
Anything that mixes rows (a reduction over tokens, a scatter) ends the walk, and the
caller reports that the rows cannot be followed. A ``Scope`` is one jaxpr of the walk:
the interpreter's frame (``evaluator._Frame.scope``), whose inputs map to the operands
of the ``jit`` it was inlined from.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jlora._apply.rows import Scope, trace_rows
  >>> def f(x, order):
  ...   return x.reshape(6, 2)[order]  # (B=2, T=3, d) -> rows in another order
  >>> x, order = jnp.zeros((2, 3, 2)), jnp.array([5, 0, 3])
  >>> closed = jax.make_jaxpr(f)(x, order)
  >>> rows = trace_rows(Scope.of(closed, x, order), closed.jaxpr.outvars[0], jnp.array([7, 8]))
  >>> rows[:, 0].tolist()
  [8, 7, 8]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore
from jax.extend.core import primitives as P

from jlora._apply.primitives import ragged_dot_general_p

# Row-preserving layout operations: (primitive, positions of the operands that carry rows).
_MOVE = {
    P.gather_p: (0,), P.dynamic_slice_p: (0,), P.slice_p: (0,), P.reshape_p: (0,), P.squeeze_p: (0,),
    P.broadcast_in_dim_p: (0,), P.transpose_p: (0,), P.rev_p: (0,), P.copy_p: (0,),
    P.sharding_constraint_p: (0,), P.concatenate_p: None,  # None: every operand
}
# Elementwise (or a cast): the rows of the output are those of any operand of the output's shape.
_ELEMENTWISE = frozenset({
    P.add_p, P.sub_p, P.mul_p, P.div_p, P.neg_p, P.max_p, P.min_p, P.abs_p, P.sign_p, P.exp_p, P.log_p,
    P.log1p_p, P.expm1_p, P.tanh_p, P.logistic_p, P.sqrt_p, P.rsqrt_p, P.integer_pow_p, P.square_p, P.pow_p,
    P.erf_p, P.select_n_p, P.clamp_p, P.convert_element_type_p, P.reduce_precision_p,
})
# Longest chain of operations followed back from one input.
MAX_DEPTH = 200
_CALLS = {P.jit_p: "jaxpr", P.closed_call_p: "call_jaxpr", P.custom_jvp_call_p: "call_jaxpr",
          P.custom_vjp_call_p: "call_jaxpr"}


def _inner(eqn):
  key = _CALLS.get(eqn.primitive)
  j = eqn.params.get(key) if key else None
  if j is None and eqn.primitive is P.custom_vjp_call_p:
    j = eqn.params.get("fun_jaxpr")
  if j is None:
    return None
  return (j.jaxpr, j.consts) if isinstance(j, jcore.ClosedJaxpr) else (j, ())


class Scope:
  """One jaxpr on the walk: its producers, how to read a variable's value, its caller."""

  def __init__(self, jaxpr, read: Callable[[Any], Any], parent: tuple["Scope", list] | None = None):
    self.jaxpr = jaxpr
    self.read = read  # var -> its value in the forward pass
    self.parent = parent  # (caller scope, the caller's operands aligned with constvars + invars)
    self.producer = {v: e for e in jaxpr.eqns for v in e.outvars}
    self.inputs = [*jaxpr.constvars, *jaxpr.invars]

  @classmethod
  def of(cls, closed, *args) -> "Scope":
    """A closed jaxpr called with ``args``, its other values computed on demand."""
    return cls(closed.jaxpr, _evaluator(closed.jaxpr, closed.consts, [lambda a=a: a for a in args]))


def _id_shape(ids_shape: tuple, shape: tuple) -> str | None:
  """How ids label an array's leading axes: ``"lead"``, ``"flat"`` (first axis = ids.size), or None."""
  if tuple(shape[:len(ids_shape)]) == tuple(ids_shape):
    return "lead"
  if len(ids_shape) > 1 and shape and shape[0] == math.prod(ids_shape):
    return "flat"
  return None


def trace_rows(scope: Scope, var, ids) -> jax.Array | None:
  """The id of every element of ``var`` (``ids`` broadcast over the roots, replayed through the
  row movements), or ``None`` when its rows cannot be followed back to the batch."""
  return _Walk(jnp.asarray(ids, jnp.int32)).rows(scope, var)


class _Walk:
  def __init__(self, ids):
    self.ids = ids
    self.memo: dict = {}
    self.subs: dict = {}

  def rows(self, scope: Scope, var, depth: int = 0):
    if isinstance(var, jcore.Literal) or depth > MAX_DEPTH:
      return None
    key = (id(scope), var)
    if key not in self.memo:
      self.memo[key] = None  # (a cycle cannot occur in a jaxpr; this guards re-entry)
      self.memo[key] = self._rows(scope, var, depth)
    return self.memo[key]

  def _rows(self, scope: Scope, var, depth: int):
    ids, shape = self.ids, tuple(var.aval.shape)
    how = _id_shape(tuple(ids.shape), shape)
    if how == "lead":
      return lax.broadcast_in_dim(ids, shape, tuple(range(ids.ndim)))
    if how == "flat":
      return lax.broadcast_in_dim(ids.reshape(-1), shape, (0,))
    eqn = scope.producer.get(var)
    if eqn is None:
      if scope.parent is None or var not in scope.inputs:
        return None
      pscope, outer = scope.parent
      u = outer[scope.inputs.index(var)]
      return None if u is None else self.rows(pscope, u, depth + 1)
    prim = eqn.primitive
    rows = _row_operands(eqn)
    if prim in _MOVE and rows:
      vals = []
      for i, u in enumerate(eqn.invars):
        if i in rows:
          r = self.rows(scope, u, depth + 1)
          if r is None:
            return None
          vals.append(r)
        else:
          vals.append(_value(scope, u))
      params = eqn.primitive.get_bind_params(eqn.params)
      return prim.bind(*vals, **params)
    if prim in _ELEMENTWISE:
      for i in rows:  # any operand of the output's shape carries the rows
        r = self.rows(scope, eqn.invars[i], depth + 1)
        if r is not None:
          return r
      return None
    if (prim is P.dot_general_p or prim is ragged_dot_general_p) and rows:
      for i in rows:  # the rows of a matmul's result are those of an operand's free axes
        x = self.rows(scope, eqn.invars[i], depth + 1)
        if x is not None:
          return _matmul_rows(eqn, i, x, shape)
      return None
    inner = _inner(eqn)
    if inner is None:
      return None
    key = (id(scope), id(eqn))
    if key not in self.subs:
      jaxpr, consts = inner
      read = _evaluator(jaxpr, consts, [_value_fn(scope, u) for u in eqn.invars])
      self.subs[key] = Scope(jaxpr, read, (scope, [*([None] * len(jaxpr.constvars)), *eqn.invars]))
    sub = self.subs[key]
    return self.rows(sub, sub.jaxpr.outvars[eqn.outvars.index(var)], depth + 1)


def _value(scope: Scope, u):
  return u.val if isinstance(u, jcore.Literal) else scope.read(u)


def _value_fn(scope: Scope, u):
  return lambda: _value(scope, u)


def _evaluator(jaxpr, consts, operand_fns):
  """``read(var)`` for a call's body: its inputs from the caller's values, the rest evaluated on demand."""
  env: dict = dict(zip(jaxpr.constvars, consts))
  args = dict(zip(jaxpr.invars, operand_fns))
  producer = {v: e for e in jaxpr.eqns for v in e.outvars}

  def read(v):
    if isinstance(v, jcore.Literal):
      return v.val
    if v not in env:
      if v in args:
        env[v] = args[v]()
      else:
        eqn = producer[v]
        params = eqn.primitive.get_bind_params(eqn.params)
        outs = eqn.primitive.bind(*[read(u) for u in eqn.invars], **params)
        env.update(zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs]))
    return env[v]

  return read


def _row_operands(eqn) -> list[int]:
  """Positions of the operands through which rows flow into ``eqn``'s output (``[]``: none)."""
  prim, ins = eqn.primitive, eqn.invars
  present = [i for i, u in enumerate(ins) if not isinstance(u, jcore.Literal)]
  if prim in _MOVE:
    pos = _MOVE[prim]
    return present if pos is None else [i for i in pos if i in present]
  if prim in _ELEMENTWISE:
    shape = tuple(eqn.outvars[0].aval.shape)
    skip = {0} if prim is P.select_n_p else set()  # the predicate
    return [i for i in present if i not in skip and tuple(ins[i].aval.shape) == shape]
  if prim is P.dot_general_p:
    return [i for i in (0, 1) if i in present]
  if prim is ragged_dot_general_p:
    return [0] if 0 in present else []
  return []


def _matmul_rows(eqn, operand: int, x, shape):
  """The ids of a matmul's result from those of one operand (``x``): its contracted axes dropped, its
  batch and free axes placed where the result has them (batch, lhs free, rhs free)."""
  if eqn.primitive is P.dot_general_p:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  else:
    (lc, rc), (lb, rb) = eqn.params["ragged_dot_dimension_numbers"].dot_dimension_numbers
  nd = [u.aval.ndim for u in eqn.invars[:2]]
  contracted, batch = (lc, lb) if operand == 0 else (rc, rb)
  free = [d for d in range(nd[operand]) if d not in contracted and d not in batch]
  if operand == 0:
    offset = len(lb)
  else:
    offset = len(lb) + (nd[0] - len(lc) - len(lb))
    if eqn.primitive is not P.dot_general_p:  # the group axis of a ragged_dot's kernel is not in the result
      return None
  where = {d: i for i, d in enumerate(batch)}
  where.update({d: offset + i for i, d in enumerate(free)})
  for d in sorted(contracted, reverse=True):
    x = lax.index_in_dim(x, 0, d, keepdims=False)
  kept = [d for d in range(nd[operand]) if d not in contracted]
  order = sorted(range(len(kept)), key=lambda i: where[kept[i]])
  x = lax.transpose(x, tuple(order))
  return lax.broadcast_in_dim(x, shape, tuple(sorted(where[d] for d in kept)))
