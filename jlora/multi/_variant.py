"""``Bank``: the variant of a kernel that holds many adapters, one per *slot*.

Each child gains a ``"slot"`` axis: ``a`` is ``(*batch, slot, *in, rank)``,
``b`` is ``(*batch, slot, rank, *out)``; ranks are zero-padded to the largest
(``spec.rank``), so a slot of a smaller rank computes exactly its own update.
Every slot's own scale (``alpha/r``, or ``alpha/√r`` for rsLoRA) is the
non-trained child ``scales`` ``(*batch, slot)``, and its true rank the
non-trained int32 child ``ranks`` (0 = an empty slot, or an adapter that does
not target this kernel). Both carry the stacked (batch) axes too, so ``scan``
over stacked layers slices them like every other child. Filling or emptying a
slot changes arrays only, never the (static) spec: a jitted function does not
recompile.

The consumers (``_select``) read ``adapter_ids`` from the interpreter context.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

from jlora._variant import AxisSpec, Variant
from jlora.multi import _select

STRATEGIES = ("auto", "gather", "onehot", "ragged")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bank(Variant):
  """A bank of ``slots`` LoRA adapters on one kernel, selected per example by ``adapter_ids``.

  Build one with ``jlora.stack`` (from trained adapters) or
  ``jlora.init(..., LoraConfig(variant=jlora.Bank(slots=n)))`` (``n`` fresh
  adapters to train side by side). ``jlora.wrap(f)(bank, x, adapter_ids=ids)``
  runs example ``i`` with the adapter in slot ``ids[i]`` (``-1``: the base only).

  Attributes:
    slots: the bank's capacity.
    strategy: how the per-example low-rank path selects its slot: ``"gather"``
      (each example's factors are gathered, then batched matmuls: the FLOPs of
      one adapter), ``"onehot"`` (every slot's rank-``r`` projections for every
      token, masked by a one-hot of the ids: ``slots×`` the LoRA FLOPs as two
      dense matmuls), ``"ragged"`` (tokens sorted by slot, then
      ``jax.lax.ragged_dot`` grouped matmuls: one adapter's FLOPs where the
      backend has a grouped-matmul kernel; XLA:CPU lowers it densely) or
      ``"auto"`` (chosen per use from the ids' shape and the bank size, by
      the measurements in ``benchmarks/bank_strategies.py``; see docs/design.md).

  Example:
    >>> import jlora
    >>> spec = jlora.LoraSpec(shape=(16, 32), layout=jlora.KernelLayout(in_axes=(0,)), rank=4,
    ...                       alpha=8.0, variant=jlora.Bank(slots=3))
    >>> spec.factor_shapes
    {'a': (3, 16, 4), 'b': (3, 4, 32), 'scales': (3,), 'ranks': (3,)}
  """

  name: ClassVar[str] = "bank"
  slots: int
  strategy: str = "auto"

  def __post_init__(self):
    if isinstance(self.slots, bool) or not isinstance(self.slots, int) or self.slots < 1:
      raise ValueError(f"jlora.Bank: slots must be a positive integer, got {self.slots!r}.")
    if self.strategy not in STRATEGIES:
      raise ValueError(f"jlora.Bank: strategy must be one of {STRATEGIES}, got {self.strategy!r}.")

  # -- storage ----------------------------------------------------------------------------
  def factor_axes(self, spec: Any) -> dict[str, AxisSpec]:
    batch = tuple(spec.batch_axes)
    return {
        "a": (*batch, "slot", *spec.in_axes, "rank"),
        "b": (*batch, "slot", "rank", *spec.out_axes),
        "scales": (*batch, "slot"),
        "ranks": (*batch, "slot"),
    }

  def special_sizes(self, spec: Any) -> dict[str, int]:
    return {"rank": spec.rank, "slot": self.slots}

  def trainable(self, name: str) -> bool:
    return name in ("a", "b")

  def init_extras(self, spec: Any, w0: Any, factors: Any) -> dict[str, Any]:
    """``jlora.init`` with a bank variant: every slot a fresh adapter of the config's rank and scale."""
    del w0, factors
    shapes = spec.factor_shapes
    return {"scales": jnp.full(shapes["scales"], spec.scale, jnp.float32),
            "ranks": jnp.full(shapes["ranks"], spec.rank, jnp.int32)}

  def describe(self) -> str:
    return f"bank[{self.slots}]"

  # -- the apply path -------------------------------------------------------------------------
  def dot(self, ctx: Any, v: Any, x: Any, base_out: Any, plan: Any) -> Any:
    return base_out + _select.dot_term(ctx, v, x, plan, strategy=self.strategy)

  def conv(self, ctx: Any, v: Any, x: Any, base_out: Any, params: dict) -> Any:
    return base_out + _select.conv_term(ctx, v, x, params, out_dtype=base_out.dtype)

  def gather(self, ctx: Any, v: Any, indices: Any, base_out: Any, params: dict) -> Any:
    return base_out + _select.gather_term(ctx, v, indices, params, out_dtype=base_out.dtype)

  def ragged_dot(self, ctx: Any, v: Any, x: Any, group_sizes: Any, base_out: Any, plan: Any) -> Any:
    return base_out + _select.ragged_term(ctx, v, x, group_sizes, plan, strategy=self.strategy)

  # -- merging ---------------------------------------------------------------------------------
  def delta(self, w: Any, dtype: Any) -> Any:
    raise ValueError(
        f"a bank of {self.slots} adapters has no single update to merge or export; take one slot "
        "out first with jlora.multi.unstack(bank, slot) (or compose several with jlora.compose).")

  def merged(self, w: Any, w0: Any) -> Any:
    return self.delta(w, jnp.float32)
