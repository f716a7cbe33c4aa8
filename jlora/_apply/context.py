"""The contract between the interpreter and the consumers: what a consumer rule may ask of it.

The interpreter (``jlora._apply.evaluator.Interpreter``) calls a variant's
consumer rules (``Variant.dot``/``conv``/``gather``) with itself as ``ctx``, and
they hand ``ctx`` on to the consumers (``jlora._apply.consumers``). This is all
that side reads of it:

* ``custom_vjp``: lower a matmul's low-rank term under the custom VJPs of
  ``jlora._apply.consumers.custom_vjp`` (what a train step saves and recomputes)
  instead of plain autodiff; the CPU default of ``jlora.wrap``;
* ``fused_expansion``: emit the rank-``r`` expansions ``t·B`` / ``dt·Aᵀ`` as
  fused multiply-adds (ranks up to ``FUSED_EXPANSION_MAX_RANK``, see
  ``fused_for``);
* ``context``: per-call inputs for variants, from ``jlora.wrap``'s keyword
  arguments (a bank's ``adapter_ids``);
* ``next_key()``: the dropout key of the next use site (``None`` without
  ``lora_rng``: no dropout). Every adapted use calls it once, in program order,
  so that each layer draws its own mask.

Example:
  >>> from jlora._apply.context import ConsumerContext
  >>> from jlora._apply.evaluator import Interpreter
  >>> interp = Interpreter(mode="lora", on_unsupported="error", rng=None, usages={})
  >>> isinstance(interp, ConsumerContext), interp.next_key() is None
  (True, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import jax

# Ranks up to this use the fused expansion when it is enabled.
FUSED_EXPANSION_MAX_RANK = 16


@runtime_checkable
class ConsumerContext(Protocol):
  """What a consumer rule (a variant's ``dot``/``conv``/``gather``) reads of the interpreter."""

  # The custom-VJP lowering of the low-rank terms (``jlora.wrap(fused_expansion=...)``).
  custom_vjp: bool
  # Rank expansions as fused multiply-adds (``fused_for``).
  fused_expansion: bool
  # Per-call inputs for variants, e.g. ``{"adapter_ids": ids}`` for a bank of adapters.
  context: Mapping[str, Any]

  def next_key(self) -> jax.Array | None:
    """The dropout key of the next use site, or ``None`` (no dropout)."""


def fused_for(ctx: ConsumerContext, rank: int) -> bool:
  """Whether the rank-``rank`` expansions of this call are fused multiply-adds.

  Example:
    >>> import types
    >>> from jlora._apply.context import fused_for
    >>> ctx = types.SimpleNamespace(fused_expansion=True)
    >>> fused_for(ctx, 8), fused_for(ctx, 64)
    (True, False)
  """
  return ctx.fused_expansion and rank <= FUSED_EXPANSION_MAX_RANK
