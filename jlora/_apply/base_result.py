"""The base result of an equation that reads LoRA kernels: the same equation on their bases.

A lazy base (a kernel stored in another form, e.g. 4-bit: ``jlora._lazy``) is
decoded inside the consumer, under a custom VJP whose residuals are the stored
arrays and whose backward pass decodes again: the dense kernel is never kept
as a residual.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jlora._apply.equations import bind
from jlora._apply.rules import is_lowrank
from jlora._lazy import LazyBase


def base_out(eqn, invals):
  """The equation's result on the bases (rules run inside the equation's source context).

  A lazy base (a kernel stored in another form, ``jlora._lazy``) is decoded inside the
  consumer and decoded again for the backward pass, never kept as a residual (see
  ``_lazy_consumer``).
  """
  bases = [x.base if is_lowrank(x) else x for x in invals]
  lazy = [i for i, b in enumerate(bases) if isinstance(b, LazyBase)]
  if not lazy:
    return bind(eqn, bases, with_source=False)
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
    return bind(eqn, full, with_source=False)

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
