"""Gradients with respect to the adapters alone: ``jlora.grad`` / ``jlora.value_and_grad``.

``jax.grad`` differentiates every leaf of its argument, so on a LoRA tree it also
differentiates the frozen base (a wasted weight gradient), and on a 4-bit base it
fails outright (``grad requires real- or complex-valued inputs ... got uint8``).
These are what ``equinox.filter_grad`` and ``nnx.grad(wrt=...)`` are to their
libraries: the function is differentiated with respect to the trained children of
one argument (``jlora.split``'s adapters), whatever else the tree holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from jlora._partition import combine, split


def value_and_grad(fn: Callable[..., Any], argnums: int = 0, *, has_aux: bool = False) -> Callable[..., Any]:
  """``jax.value_and_grad`` with respect to the adapters of the LoRA tree at ``argnums``.

  Args:
    fn: a function of a LoRA tree (``jlora.init``'s output, dense or 4-bit base) and
      other arguments, returning a scalar (and aux with ``has_aux``).
    argnums: which positional argument is the LoRA tree (one; the others are constants).
    has_aux: as in ``jax.value_and_grad``.

  Returns:
    A function with ``fn``'s signature returning ``(value, grads)`` (``((value, aux),
    grads)`` with ``has_aux``); ``grads`` is shaped like ``jlora.split(tree)[0]``: the
    adapters' gradients, ``None`` for everything frozen (what ``jlora.optimizer`` takes).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> lp = jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4))}, jlora.LoraConfig(rank=2, targets="w"))
    >>> loss = lambda p, x: jnp.sum(jlora.wrap(lambda p, x: x @ p["w"])(p, x) ** 2)
    >>> value, grads = jlora.value_and_grad(loss)(lp, jnp.ones((1, 4)))
    >>> grads["w"].a.shape, grads["w"].w0 is None
    ((4, 2), True)
  """
  if not isinstance(argnums, int):
    raise ValueError(f"jlora.value_and_grad: argnums must be one int (the LoRA tree's position), got {argnums!r}")

  def wrapped(*args: Any, **kwargs: Any):
    if not 0 <= argnums < len(args):
      raise ValueError(f"jlora.value_and_grad: argnums={argnums}, but the function got {len(args)} positional "
                       "arguments; pass the LoRA tree positionally")
    adapters, frozen = split(args[argnums])

    def of_adapters(a):
      return fn(*_replaced(args, argnums, combine(a, frozen)), **kwargs)

    return jax.value_and_grad(of_adapters, has_aux=has_aux)(adapters)

  return wrapped


def grad(fn: Callable[..., Any], argnums: int = 0, *, has_aux: bool = False) -> Callable[..., Any]:
  """``jax.grad`` with respect to the adapters of the LoRA tree at ``argnums`` (see ``value_and_grad``).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> base = jlora.quantize({"w": jnp.ones((64, 8))}, targets="w")   # a 4-bit base: jax.grad would fail
    >>> lp = jlora.init(jax.random.key(0), base, jlora.LoraConfig(rank=2, targets="w"))
    >>> g = jlora.grad(lambda p: jnp.sum(jlora.wrap(lambda p: jnp.ones((1, 64)) @ p["w"])(p)))(lp)
    >>> g["w"].b.shape
    (2, 8)
  """
  vg = value_and_grad(fn, argnums, has_aux=has_aux)

  def wrapped(*args: Any, **kwargs: Any):
    value, g = vg(*args, **kwargs)
    return (g, value[1]) if has_aux else g

  return wrapped


def _replaced(args: Sequence[Any], i: int, value: Any) -> tuple[Any, ...]:
  return (*args[:i], value, *args[i + 1:])
