"""The layer input as the low-rank path sees it: LoRA dropout (training only), in the factors' dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora._apply.context import ConsumerContext
from jlora._apply.lowrank import LowRank


def dropout(x, rate: float, key):
  """LoRA dropout on the layer input (PEFT's): none without a key (inference) or at rate 0."""
  if key is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def lora_input(ctx: ConsumerContext, v: LowRank, x):
  """The layer input as the low-rank path sees it: LoRA dropout (training only), factor dtype."""
  spec = v.source.spec
  return dropout(x, spec.dropout, ctx.next_key()).astype(v.a.dtype)
