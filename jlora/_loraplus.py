"""LoRA+ (Hayou et al. 2024): a larger learning rate for B than for A, as an optax transform.

PEFT's ``create_loraplus_optimizer`` puts ``lora_B`` and every 1-D adapter
parameter (DoRA's magnitude) in a group with ``lr × loraplus_lr_ratio``, the
adapters of embedding layers in a group with their own learning rate, and the
rest (``lora_A``) at ``lr``. For optimizers whose update is proportional to the
learning rate (SGD, momentum, Adam, AdamW with its decoupled decay), scaling a
group's *updates* by a ratio is exactly training it with ``lr × ratio``; that is
what ``loraplus_scale`` does after the inner optimizer, so the inner optimizer
keeps one state and global operations such as gradient clipping still see all
adapters at once. (It lives beside ``_optim``, whose ``loraplus_ratio`` uses it;
``jlora.variants`` exports it with the rest of the LoRA family.)
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from jlora._weight import LoraWeight, is_lora_weight

Params = Any
# Children PEFT stores as 2-D although one axis is a singleton (AdaLoRA's lora_E is [r, 1]).
_PEFT_2D = {("adalora", "e")}


def _variant_name(w: LoraWeight) -> str:
  v = w.spec.variant
  return getattr(v, "inner", v).name


def group(w: LoraWeight, name: str) -> str:
  """LoRA+ group of child ``name``: ``"lora_b"``, ``"lora_a"`` or ``"lora_embedding"``.

  As PEFT's ``create_loraplus_optimizer`` groups parameters: an embedding's A and B
  form the embedding group; B and every 1-D parameter (DoRA's magnitude, an
  embedding's too) the B group; the rest the A group.
  """
  if w.spec.layout.embedding and name in ("a", "b"):  # PEFT: lora_embedding_A/B of an Embedding layer
    return "lora_embedding"
  per_layer_ndim = len(w.spec.factor_axes[name]) - len(w.spec.batch_axes)
  if name == "b" or (per_layer_ndim == 1 and (_variant_name(w), name) not in _PEFT_2D):
    return "lora_b"
  return "lora_a"


def loraplus_labels(params: Params) -> Params:
  """Labels every leaf ``"lora_a"``, ``"lora_b"``, ``"lora_embedding"`` or ``"frozen"``.

  For ``optax.partition`` with a learning rate per group (PEFT's groups, e.g. an
  absolute rate for embedding adapters as ``loraplus_lr_embedding``).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> lp = jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4))}, jlora.LoraConfig(rank=2, targets="w", dora=True))
    >>> jax.tree.leaves(jlora.variants.loraplus_labels(lp))
    ['frozen', 'lora_a', 'lora_b', 'lora_b']
  """

  def label(x):
    if is_lora_weight(x):
      kids = {n: None if v is None else (group(x, n) if x.trainable(n) else "frozen")
              for n, v in (("w0", x.w0), *x.factors.items())}
      kids["w0"] = None if x.w0 is None else "frozen"
      return x.replace(**kids)
    return "frozen"

  return jax.tree_util.tree_map(label, params, is_leaf=is_lora_weight)


def loraplus_scale(ratio: float, *, embedding_ratio: float = 1.0) -> optax.GradientTransformation:
  """Multiplies the updates of B-group children by ``ratio`` and of embedding adapters by ``embedding_ratio``.

  Chain it after the optimizer (``jlora.optimizer(..., loraplus_ratio=...)`` does).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> lp = jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4))}, jlora.LoraConfig(rank=2, targets="w"))
    >>> ones = jax.tree.map(jnp.ones_like, lp)
    >>> u, _ = jlora.variants.loraplus_scale(16.0).update(ones, None)
    >>> float(u["w"].a[0, 0]), float(u["w"].b[0, 0])
    (1.0, 16.0)
  """
  for what, r in (("ratio", ratio), ("embedding_ratio", embedding_ratio)):
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0:
      raise ValueError(f"LoRA+ {what} must be a number > 0, got {r!r}.")
  factor = {"lora_b": float(ratio), "lora_a": 1.0, "lora_embedding": float(embedding_ratio)}

  def update_fn(updates, state, params=None):
    del params

    def scale(w):
      if not is_lora_weight(w):
        return w
      kids = {}
      for name, u in w.factors.items():
        if u is None or isinstance(u, optax.MaskedNode) or not w.trainable(name):
          continue
        f = factor[group(w, name)]
        kids[name] = u if f == 1.0 else u * f
      return w.replace(**kids)

    return jax.tree_util.tree_map(scale, updates, is_leaf=is_lora_weight), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
