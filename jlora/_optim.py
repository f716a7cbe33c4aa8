"""``jlora.optimizer``: an optax transform that trains only the adapter factors."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jlora._loraplus import loraplus_scale
from jlora._partition import labels
from jlora._weight import is_lora_weight


def optimizer(inner: optax.GradientTransformation, params: Any, *, loraplus_ratio: float | None = None,
              loraplus_embedding_ratio: float = 1.0) -> optax.GradientTransformation:
  """Wraps ``inner`` so that only LoRA factors are updated.

  Built on ``optax.partition``: ``a``/``b`` leaves get ``inner``; every other
  leaf gets ``optax.set_to_zero()`` and holds no optimizer state. Works on the
  full LoRA tree and on the ``adapters`` half from ``jlora.split`` (the
  cheaper choice: gradients are then taken w.r.t. the adapters only).

  With ``loraplus_ratio`` (LoRA+, PEFT's ``create_loraplus_optimizer``), B and
  every 1-D adapter parameter (DoRA's magnitude) train with ``ratio`` times the
  learning rate, embedding adapters with ``loraplus_embedding_ratio`` times it
  (PEFT's ``loraplus_lr_embedding / lr``); see ``jlora.variants.loraplus_scale``.

  Args:
    inner: the optimizer for the adapters, e.g. ``optax.adamw(1e-4)``.
    params: the LoRA tree (checked to contain adapters).
    loraplus_ratio: LoRA+ learning-rate ratio of B to A (PEFT suggests ~16).
    loraplus_embedding_ratio: with LoRA+, the learning-rate ratio of embedding adapters to A.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> lp = jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4))}, jlora.LoraConfig(rank=2, targets="w"))
    >>> tx = jlora.optimizer(optax.adam(1e-3), lp)
    >>> state = tx.init(lp)
    >>> sum(x.size for x in jax.tree.leaves(state))  # adam's mu and nu for A and B, plus a count
    33
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise ValueError(
        f"jlora.optimizer: inner must be an optax.GradientTransformation, got {type(inner).__name__}."
    )
  leaves = jax.tree_util.tree_leaves(params, is_leaf=is_lora_weight)
  if not any(is_lora_weight(x) and x.a is not None for x in leaves):
    raise ValueError("jlora.optimizer: params hold no adapter factors; pass the tree from jlora.init.")
  if loraplus_ratio is not None:
    inner = optax.chain(inner, loraplus_scale(loraplus_ratio, embedding_ratio=loraplus_embedding_ratio))
  return optax.partition({"lora": inner, "frozen": optax.set_to_zero()}, labels)
