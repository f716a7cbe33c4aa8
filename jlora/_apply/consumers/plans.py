"""How a matmul consumes a LoRA kernel: the labels of its input and result, and which factor first.

``dot_plan`` labels the layer input and the result of a ``dot_general`` once
(``DotPlan``); every consumer of a matmul (plain LoRA, a variant's, a bank's)
works from that plan. ``orientation`` says which factor the input meets first:
``A`` (it holds the contracted input axes), or ``B`` for an embedding table used
as a tied output projection; any other use is an ``OrientationError``.
``factor_order`` gives the factors in that order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jlora._apply.lowrank import Label, LowRank, new_label, prov
from jlora._apply.recompute import Recompute
from jlora._errors import OrientationError


def orientation(v: LowRank, contracted: frozenset, what: str) -> str:
  """Which factor the layer input meets first; raises if the use is transposed."""
  c = frozenset(l for l in contracted if l.axes)
  a_only = frozenset(l for l in v.a_only if l.axes)
  b_only = frozenset(l for l in v.b_only if l.axes)
  if c and c == a_only:
    return "a"
  spec = v.source.spec
  if c and c == b_only and spec.layout.embedding:
    return "b"
  got = tuple(sorted(prov(c)))
  raise OrientationError(
      f"{v.path!r} is {what} over kernel axes {got}, but its adapter was created with input "
      f"axes {spec.in_axes} (A covers the input axes, B the output axes {spec.out_axes}). The "
      "layer uses this kernel in another orientation (e.g. stored transposed like GPT-2's "
      "Conv1D). Re-create the adapters with jlora.init(..., layout=jlora.infer_layout(apply_fn, "
      "params, *example_args)) or give the rule layout=jlora.KernelLayout(in_axes=...)."
  )


@dataclasses.dataclass(frozen=True)
class DotPlan:
  """How a ``dot_general`` consumes a LoRA kernel, in labels (see ``dot_plan``)."""

  v_is_lhs: bool
  x_labels: tuple  # labels of the layer input's axes (contracted/batch ones shared with the kernel)
  out_labels: tuple  # labels of the result's axes
  first: str  # the factor the input meets first: "a" (or "b" for a tied embedding used as output)
  precision: Any
  out_dtype: Any
  recompute: Recompute | None = None  # how the backward pass may rebuild the input instead of saving it
  # ``rows(ids)``: per-example ids at every element of the input, followed back through data movement
  # (``jlora._apply.rows``; ``None`` when they cannot be): for a bank on an input that flattened its batch.
  rows: Callable[[Any], Any] | None = None


def dot_plan(v: LowRank, x, *, v_is_lhs: bool, dimension_numbers, precision, out_dtype,
             recompute: Recompute | None = None, rows: Callable[[Any], Any] | None = None) -> DotPlan:
  """Labels the input and the result of ``dot_general(x, v)`` (or ``(v, x)``).

  ``recompute`` (from the interpreter) says how the backward pass can rebuild ``x``
  from values it keeps anyway; ``lora_dot_term`` uses it.
  """
  (lc, rc), (lb, rb) = dimension_numbers
  if v_is_lhs:
    vc, xc, vb, xb = lc, rc, lb, rb
  else:
    xc, vc, xb, vb = lc, rc, lb, rb
  x_labels: list[Label] = [new_label() for _ in range(x.ndim)]
  for xi, vi in zip(xc, vc):
    x_labels[xi] = v.labels[vi]
  for xi, vi in zip(xb, vb):
    x_labels[xi] = v.labels[vi]
  batch = [v.labels[i] for i in vb]
  x_free = [x_labels[i] for i in range(x.ndim) if i not in xc and i not in xb]
  v_free = [v.labels[i] for i in range(len(v.labels)) if i not in vc and i not in vb]
  out_labels = batch + (v_free + x_free if v_is_lhs else x_free + v_free)
  first = orientation(v, frozenset(v.labels[i] for i in vc), "contracted")
  return DotPlan(v_is_lhs, tuple(x_labels), tuple(out_labels), first, precision, out_dtype, recompute, rows)


def factor_order(v: LowRank, plan: DotPlan, factors: tuple[Any, Any] | None = None) -> tuple[Any, tuple, Any, tuple]:
  """``(f1, f1_labels, f2, f2_labels)``: the factor the layer input meets first, then the other.

  ``factors`` optionally replaces ``(a, b)`` (same labels), e.g. a variant's
  effective factors.
  """
  a, b = factors if factors is not None else (v.a, v.b)
  if plan.first == "a":
    return a, v.a_labels, b, v.b_labels
  return b, v.b_labels, a, v.a_labels
