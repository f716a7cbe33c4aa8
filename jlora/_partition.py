"""``split`` / ``combine``: trainable adapters apart from the frozen rest, and back."""

from __future__ import annotations

from typing import Any

import jax

from jlora._weight import LoraWeight, is_lora_weight, is_node

Params = Any


def _keep(w: LoraWeight, keep) -> LoraWeight:
  """``w`` with every child for which ``keep(name)`` is false set to ``None``."""
  return w.replace(**{n: (v if keep(n) else None) for n, v in (("w0", w.w0), *w.factors.items())})


def split(params: Params) -> tuple[Params, Params]:
  """Splits a LoRA tree into ``(adapters, frozen)`` with the same structure.

  ``adapters`` keeps only the trained children (the ``a``/``b`` factors and a
  variant's trained parameters; every other leaf is ``None``); ``frozen`` keeps
  everything else. Differentiate and optimise
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
    return _keep(x, lambda name: x.trainable(name)) if is_lora_weight(x) else None

  def frozen_part(x):
    return _keep(x, lambda name: not x.trainable(name)) if is_lora_weight(x) else x

  if not any(is_lora_weight(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_lora_weight)):
    raise ValueError("jlora.split: the tree holds no LoraWeight; create adapters with jlora.init first.")
  # Kernels stored in another form (jlora._lazy) are frozen leaves as a whole.
  adapters = jax.tree_util.tree_map(adapter_part, params, is_leaf=is_node)
  frozen = jax.tree_util.tree_map(frozen_part, params, is_leaf=is_node)
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
      if not (is_lora_weight(a) and is_lora_weight(f)) or a.spec.factor_axes != f.spec.factor_axes:
        raise ValueError("jlora.combine: a LoraWeight faces a plain leaf; the halves come from different trees.")
      def child(n):
        x, y = ((a.w0, f.w0) if n == "w0" else (a.factors[n], f.factors[n]))
        return y if x is None else x

      kids = {n: child(n) for n in ("w0", *a.factors)}
      return f.replace(**kids)
    return f if a is None else a

  return jax.tree_util.tree_map(pick, adapters, frozen, is_leaf=lambda x: x is None or is_lora_weight(x))


def labels(params: Params) -> Params:
  """Labels each leaf ``"lora"`` (a trained adapter child) or ``"frozen"`` (anything else).

  Works on full trees and on ``split`` halves; ``None`` positions stay ``None``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> lp = jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4))}, jlora.LoraConfig(rank=2, targets="w"))
    >>> jax.tree.leaves(jlora.labels(lp))
    ['frozen', 'lora', 'lora']
  """

  def label(x):
    if is_lora_weight(x):
      kids = {n: None if v is None else ("lora" if x.trainable(n) else "frozen")
              for n, v in (("w0", x.w0), *x.factors.items())}
      return x.replace(**kids)
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
