"""``jlora.count``: trainable vs total parameters and adapter bytes."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jlora._lazy import is_lazy_node, lazy_of
from jlora._weight import is_lora_weight


@dataclasses.dataclass(frozen=True)
class ParamCount:
  """Parameter counts of a LoRA tree (works on ``ShapeDtypeStruct`` trees too)."""

  trainable: int  # elements of the trained adapter children (A, B, ...)
  frozen: int  # every other element (base kernels included)
  adapter_bytes: int  # bytes of every adapter child
  frozen_bytes: int
  num_adapters: int

  @property
  def total(self) -> int:
    return self.trainable + self.frozen

  @property
  def trainable_fraction(self) -> float:
    return self.trainable / self.total if self.total else 0.0

  def __str__(self) -> str:
    return (
        f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
        f"trainable%: {100 * self.trainable_fraction:.4f} || adapters: {self.num_adapters} "
        f"({self.adapter_bytes / 2**20:.2f} MiB)"
    )


def _size_bytes(x) -> tuple[int, int]:
  """Elements and stored bytes; a lazy kernel (e.g. 4-bit) counts its dense elements, stored bytes."""
  if x is None:
    return 0, 0
  if is_lazy_node(x):
    n = int(np.prod(lazy_of(x).shape, dtype=np.int64))
    return n, sum(_size_bytes(c)[1] for c in jax.tree_util.tree_leaves(x))
  if not hasattr(x, "shape"):
    return 0, 0
  n = int(np.prod(x.shape, dtype=np.int64))
  return n, n * np.dtype(x.dtype).itemsize


def count(params: Any) -> ParamCount:
  """Counts trainable (adapter) and frozen elements and bytes.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> lp = jlora.init(jax.random.key(0), {"w": jnp.ones((64, 64))}, jlora.LoraConfig(rank=4, targets="w"))
    >>> c = jlora.count(lp)
    >>> c.trainable, c.total
    (512, 4608)
  """
  trainable = frozen = abytes = fbytes = n = 0
  for leaf in jax.tree_util.tree_leaves(params, is_leaf=lambda x: is_lora_weight(x) or is_lazy_node(x)):
    if is_lora_weight(leaf):
      n += 1
      for name, f in leaf.factors.items():
        e, b = _size_bytes(f)
        abytes += b
        if leaf.trainable(name):
          trainable += e
        else:
          frozen += e
      e, b = _size_bytes(leaf.w0)
      frozen += e
      fbytes += b
    else:  # plain leaves, and lazy (e.g. 4-bit) kernels without an adapter
      e, b = _size_bytes(leaf)
      frozen += e
      fbytes += b
  return ParamCount(trainable, frozen, abytes, fbytes, n)
