"""``to_lora``: express a finished adapter as a plain LoRA (what PEFT and vLLM load)."""

from __future__ import annotations

from typing import Any

import jax

from jlora._tree import leaves_with_paths, path_str
from jlora._weight import is_lora_weight
from jlora.variants import _adalora, _residual

Params = Any


def to_lora(params: Params, *, base: Params | None = None) -> Params:
  """Converts AdaLoRA and PiSSA/OLoRA adapters into plain adapters with the same update.

  * AdaLoRA: a plain LoRA per kernel with the kept rank (``Λ`` folded into A,
    the scale kept); a kernel that kept no rank loses its adapter.
  * PiSSA/OLoRA (``Residual``): rank 2r on the original base (PEFT's
    ``subtract_mutated_init``); pass the original ``base`` params to put them
    back exactly, otherwise ``W_res + s·B0·A0`` stands in for them. A DoRA
    adapter stays a DoRA adapter.

  Plain LoRA and DoRA adapters are returned unchanged.

  Args:
    params: a LoRA tree.
    base: the original base parameters (for Residual adapters), same structure.

  Returns:
    A new tree.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> lp = jlora.init(jax.random.key(0), {"w": jnp.eye(4)}, jlora.LoraConfig(rank=1, targets="w", init="olora"))
    >>> jlora.variants.to_lora(lp)["w"].spec.rank
    2
  """
  bases = dict(leaves_with_paths(base, is_leaf=is_lora_weight)) if base is not None else {}

  def convert(path, w):
    if not is_lora_weight(w):
      return w
    variant = w.spec.variant
    p = path_str(path)
    if isinstance(variant, _adalora.AdaLoRA):
      if not w.is_complete:
        raise ValueError(f"jlora.variants.to_lora: {p!r} is incomplete; pass jlora.combine(adapters, frozen).")
      return _adalora.to_plain(w)
    if isinstance(variant, _residual.Residual):
      if not w.is_complete:
        raise ValueError(f"jlora.variants.to_lora: {p!r} is incomplete; pass jlora.combine(adapters, frozen).")
      if base is not None and p not in bases:
        raise ValueError(f"jlora.variants.to_lora: base has no {p!r}; pass the original base parameters.")
      return _residual.to_plain(w, bases.get(p))
    return w

  return jax.tree_util.tree_map_with_path(convert, params, is_leaf=is_lora_weight)
