"""``merge`` (fold adapters into the base) and ``unload`` (drop them)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jlora._lazy import dense, is_lazy_node, placeholder
from jlora._weight import is_lora_weight, is_node

Params = Any


def merge(params: Params) -> Params:
  """Folds every adapter into its kernel: ``W = W0 + scale·(A⊗B)`` (or the variant's merge).

  The merge is computed in float32 and cast to ``W0``'s dtype at the end, so the
  result has the original structure and dtypes and runs with the plain,
  unwrapped apply function at zero overhead. Kernels stored in another form
  (e.g. ``jlora.NF4Weight``) are decoded straight to float32 before the sum and
  come out dense in their compute dtype, also where they carry no adapter.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> lp = jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4), jnp.bfloat16)},
    ...                 jlora.LoraConfig(rank=2, targets="w"))
    >>> jlora.merge(lp)["w"].dtype
    dtype(bfloat16)
  """

  def fold(x):
    if is_lazy_node(x):  # a frozen kernel stored in another form, without adapter
      return dense(x)
    if not is_lora_weight(x):
      return x
    if not x.is_complete:
      raise ValueError(f"jlora.merge: incomplete LoraWeight {x!r}; combine the split halves first.")
    dtype = placeholder(x.w0).dtype if is_lazy_node(x.w0) else x.w0.dtype
    return x.spec.variant.merged(x, dense(x.w0, jnp.float32)).astype(dtype)

  return jax.tree_util.tree_map(fold, params, is_leaf=is_node)


def unload(params: Params) -> Params:
  """Drops every adapter and returns the original base tree (exact).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> p = {"w": jnp.ones((4, 4))}
    >>> lp = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=2, targets="w"))
    >>> bool((jlora.unload(lp)["w"] == p["w"]).all())
    True
  """
  return jax.tree_util.tree_map(lambda x: x.w0 if is_lora_weight(x) else x, params, is_leaf=is_lora_weight)
