"""``jlora.count``: trainable vs total parameters and adapter bytes."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jlora._lazy import is_lazy_node, lazy_of
from jlora._targets import ATTENTION, OTHER, ROUTED, ROUTER, SHARED, kernel_kind
from jlora._tree import leaves_with_paths
from jlora._weight import is_lora_weight


_PLURAL = {ROUTED: "routed experts", SHARED: "shared experts", ATTENTION: "attention", ROUTER: "routers",
           OTHER: "other"}


@dataclasses.dataclass(frozen=True)
class ParamCount:
  """Parameter counts of a LoRA tree (works on ``ShapeDtypeStruct`` trees too)."""

  trainable: int  # elements of the trained adapter children (A, B, ...)
  frozen: int  # every other element (base kernels included)
  adapter_bytes: int  # bytes of every adapter child
  frozen_bytes: int
  num_adapters: int
  # For a mixture of experts (a tree with routed or shared expert kernels): ``(kind, adapters,
  # trainable elements)`` per kind of kernel (``jlora._targets.kernel_kind``: routed expert,
  # shared expert, attention, router, other), so that experts left without adapters show; else ``()``.
  kinds: tuple[tuple[str, int, int], ...] = ()

  @property
  def total(self) -> int:
    return self.trainable + self.frozen

  @property
  def trainable_fraction(self) -> float:
    return self.trainable / self.total if self.total else 0.0

  def __str__(self) -> str:
    line = (
        f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
        f"trainable%: {100 * self.trainable_fraction:.4f} || adapters: {self.num_adapters} "
        f"({self.adapter_bytes / 2**20:.2f} MiB)"
    )
    if self.kinds:
      parts = [f"{_PLURAL[kind]}: {n}" + (f" ({params:,} params)" if n else "") for kind, n, params in self.kinds
               if n or kind in (ROUTED, SHARED, ATTENTION)]
      line += " || " + ", ".join(parts)
    return line


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

  In a mixture of experts the line also counts the adapters of routed experts, shared experts
  and attention apart (a routed expert left without adapters shows as 0):

    >>> p = {"mlp": {"experts": {"up": {"kernel": jnp.ones((4, 8, 8))}}}, "attn": {"q": {"kernel": jnp.ones((8, 8))}}}
    >>> lp = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=2, targets=".*/q/kernel"))
    >>> str(jlora.count(lp)).split(" || ")[-1]
    'routed experts: 0, shared experts: 0, attention: 1 (32 params)'

  """
  trainable = frozen = abytes = fbytes = n = 0
  entries = list(leaves_with_paths(params, is_leaf=lambda x: is_lora_weight(x) or is_lazy_node(x)))
  kernels = [p for p, leaf in entries if len(getattr(leaf, "shape", ())) >= 2]
  kind_of = {p: kernel_kind(p, kernels) for p in kernels}
  per_kind = {k: [0, 0] for k in (ROUTED, SHARED, ATTENTION, ROUTER, OTHER)}
  for path, leaf in entries:
    if is_lora_weight(leaf):
      n += 1
      tally = per_kind[kind_of.get(path, OTHER)]
      tally[0] += 1
      for name, f in leaf.factors.items():
        e, b = _size_bytes(f)
        abytes += b
        if leaf.trainable(name):
          trainable += e
          tally[1] += e
        else:
          frozen += e
      e, b = _size_bytes(leaf.w0)
      frozen += e
      fbytes += b
    else:  # plain leaves, and lazy (e.g. 4-bit) kernels without an adapter
      e, b = _size_bytes(leaf)
      frozen += e
      fbytes += b
  moe = any(k in (ROUTED, SHARED) for k in kind_of.values())
  kinds = tuple((k, a, t) for k, (a, t) in per_kind.items()) if moe else ()
  return ParamCount(trainable, frozen, abytes, fbytes, n, kinds)
