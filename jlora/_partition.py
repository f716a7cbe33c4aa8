"""``split`` / ``combine``: trainable adapters apart from the frozen rest, and back."""

from __future__ import annotations

from typing import Any

import jax

from jlora._weight import LoraWeight, is_lora_weight

Params = Any


def split(params: Params) -> tuple[Params, Params]:
  """Splits a LoRA tree into ``(adapters, frozen)`` with the same structure.

  ``adapters`` keeps only the ``a``/``b`` factors (every other leaf is
  ``None``); ``frozen`` keeps everything else. Differentiate and optimise
  ``adapters`` only; ``jlora.combine`` puts the halves back together exactly.

  Args:
    params: a tree from ``jlora.init``.

  Returns:
    ``(adapters, frozen)``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> lp = jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4)), "b": jnp.zeros(4)},
    ...                 jlora.LoraConfig(rank=2, targets="w"))
    >>> adapters, frozen = jlora.split(lp)
    >>> adapters["b"] is None, frozen["w"].a is None
    (True, True)
  """

  def adapter_part(x):
    return x.replace(w0=None) if is_lora_weight(x) else None

  def frozen_part(x):
    return x.replace(a=None, b=None) if is_lora_weight(x) else x

  if not any(is_lora_weight(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_lora_weight)):
    raise ValueError("jlora.split: the tree holds no LoraWeight; create adapters with jlora.init first.")
  adapters = jax.tree_util.tree_map(adapter_part, params, is_leaf=is_lora_weight)
  frozen = jax.tree_util.tree_map(frozen_part, params, is_leaf=is_lora_weight)
  return adapters, frozen


def combine(adapters: Params, frozen: Params) -> Params:
  """Inverse of ``jlora.split``: fills every ``None`` of one half from the other.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> lp = jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4))}, jlora.LoraConfig(rank=2, targets="w"))
    >>> jlora.combine(*jlora.split(lp))["w"].is_complete
    True
  """

  def pick(a, f):
    if is_lora_weight(a) or is_lora_weight(f):
      if not (is_lora_weight(a) and is_lora_weight(f)):
        raise ValueError("jlora.combine: a LoraWeight faces a plain leaf; the halves come from different trees.")
      return LoraWeight(
          f.w0 if a.w0 is None else a.w0,
          a.a if f.a is None else f.a,
          a.b if f.b is None else f.b,
          f.spec,
      )
    return f if a is None else a

  return jax.tree_util.tree_map(pick, adapters, frozen, is_leaf=lambda x: x is None or is_lora_weight(x))


def labels(params: Params) -> Params:
  """Labels each leaf ``"lora"`` (an ``a``/``b`` factor) or ``"frozen"`` (anything else).

  Works on full trees and on ``split`` halves; ``None`` positions stay ``None``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> lp = jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4))}, jlora.LoraConfig(rank=2, targets="w"))
    >>> jax.tree.leaves(jlora.labels(lp))
    ['frozen', 'lora', 'lora']
  """

  def label(x):
    if is_lora_weight(x):
      return LoraWeight(
          None if x.w0 is None else "frozen",
          None if x.a is None else "lora",
          None if x.b is None else "lora",
          x.spec,
      )
    return "frozen"

  return jax.tree_util.tree_map(label, params, is_leaf=is_lora_weight)


def trainable_mask(params: Params) -> Params:
  """Boolean tree: ``True`` on adapter factors (for ``optax.masked`` and friends).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> lp = jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4))}, jlora.LoraConfig(rank=2, targets="w"))
    >>> jax.tree.leaves(jlora.trainable_mask(lp))
    [False, True, True]
  """
  return jax.tree_util.tree_map(lambda l: l == "lora", labels(params))
