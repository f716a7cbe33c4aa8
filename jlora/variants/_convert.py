"""``to_lora``: express a finished adapter as a plain LoRA (what PEFT and vLLM load)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jlora._lazy import dense
from jlora._tree import leaves_with_paths, path_str
from jlora._variant import lowrank_delta
from jlora._weight import is_lora_weight
from jlora.variants import _adalora, _residual
from jlora.variants._dora import DoRA, _kernel_view

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


def merge_adapters(*trees: Params) -> Params:
  """Merges several adapters trained on the same base, in order, as PEFT merges active adapters.

  Plain LoRA adds its update (``W ← W + ΔW_i``); DoRA scales the accumulated weight
  (``W ← m_i/‖W0 + ΔW_i‖ ⊙ (W + ΔW_i)``) with the norm of the *unmerged* base
  ``W0`` — PEFT's forward with several active DoRA adapters, and its merge since
  PEFT #3608. Computed in float32, cast to the base dtype at the end.

  Args:
    *trees: LoRA trees over the same base (each ``jlora.init`` / ``jlora.peft.load``).

  Returns:
    Plain parameters.

  Raises:
    ValueError: no trees, or trees of different structures.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> base = {"w": jnp.ones((4, 4))}
    >>> one = jlora.init(jax.random.key(0), base, jlora.LoraConfig(rank=1, targets="w"))
    >>> two = jlora.init(jax.random.key(1), base, jlora.LoraConfig(rank=1, targets="w", dora=True))
    >>> jlora.variants.merge_adapters(one, two)["w"].shape
    (4, 4)
  """
  if not trees:
    raise ValueError("merge_adapters: give at least one LoRA tree.")
  flat = [jax.tree_util.tree_flatten(t, is_leaf=is_lora_weight) for t in trees]
  if any(td != flat[0][1] for _, td in flat[1:]):
    raise ValueError("merge_adapters: the trees have different structures; give adapters of one base.")
  out = []
  for group in zip(*(leaves for leaves, _ in flat)):
    ws = [x for x in group if is_lora_weight(x)]
    if not ws:
      out.append(group[0])
      continue
    w0 = dense(ws[0].w0)
    base = w0.astype(jnp.float32)
    acc = base
    for w in ws:
      if w.shape != ws[0].shape:
        raise ValueError("merge_adapters: adapters of one kernel have different shapes.")
      if isinstance(w.spec.variant, DoRA):  # m / ‖W0 + ΔW‖ of the unmerged base, on the accumulated weight
        d = lowrank_delta(w, dtype=jnp.float32)
        n = jnp.sqrt(jnp.sum(jnp.square(base + d), axis=w.spec.in_axes, keepdims=True))
        acc = (acc + d) * (_kernel_view(w.spec, jnp.asarray(w.factors["magnitude"], jnp.float32)) / n)
      else:
        acc = acc + w.spec.variant.delta(w.replace(w0=w0), jnp.float32)
    out.append(acc.astype(w0.dtype))
  return jax.tree_util.tree_unflatten(flat[0][1], out)
