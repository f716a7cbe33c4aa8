"""Label arithmetic shared by the variants' consumer rules (DoRA's norm, per-output scales).

A ``LowRank`` value's axes carry labels (``jlora._apply.lowrank``); ``a`` holds the
input-side labels, ``b`` the output-side ones, both the stacked (batch) labels
and ``RANK``. These helpers compute per-output quantities on those labels and
broadcast them onto a consumer's result, whatever transposes, reshapes or scans
the model applied to the kernel first.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora._apply.lowrank import RANK, Label, Letters, LowRank, new_label
from jlora._errors import Unsupported


def input_labels(v: LowRank) -> list[Label]:
  """Value labels on the input side (held by ``a`` only), in value order."""
  a_only = v.a_only
  return [l for l in v.labels if l in a_only]


def output_labels(v: LowRank) -> list[Label]:
  """Value labels held by ``b``: the stacked and output axes, in value order."""
  held = set(v.b_labels)
  return [l for l in v.labels if l in held]


def check_full_input(v: LowRank, what: str) -> None:
  """A per-output norm over the input axes needs all of them: refuse a sliced input axis."""
  sizes = {l: n for l, n in zip(v.labels, v.base.shape)}
  fan_in = int(np.prod([sizes[l] for l in input_labels(v)], dtype=np.int64))
  if fan_in != v.source.spec.fan_in:
    raise Unsupported(f"{what} of a slice of the kernel's input axes ({fan_in} of "
                      f"{v.source.spec.fan_in} input features): the norm over the input axes needs them all")


def align(x: jax.Array, x_labels, target_labels) -> jax.Array:
  """``x`` transposed and reshaped (size-1 axes) to broadcast against ``target_labels``."""
  x_labels = list(x_labels)
  missing = [l for l in x_labels if l not in target_labels]
  if missing:
    raise Unsupported("a per-output scale whose axes the consumer's result does not keep")
  present = [l for l in target_labels if l in x_labels]
  x = jnp.transpose(x, [x_labels.index(l) for l in present])
  shape = [x.shape[present.index(l)] if l in present else 1 for l in target_labels]
  return jnp.reshape(x, shape)


def _einsum(spec_parts, out, *operands, precision=lax.Precision.HIGHEST):
  L = Letters()
  spec = ",".join(L(p) for p in spec_parts) + "->" + L(out)
  return jnp.einsum(spec, *operands, precision=precision)


def dense_base(v: LowRank) -> jax.Array:
  """The base as a dense array (a lazy, e.g. 4-bit, base is decoded here)."""
  return v.dense_base()


def weight_norm(v: LowRank, a: Any, b: Any, scale: Any) -> tuple[jax.Array, list[Label]]:
  """``‖base + scale·(a⊗b)‖`` over the input axes, per output (and stacked) feature, in float32.

  Computed as ``‖W‖² + 2s·⟨W, BA⟩ + s²·‖BA‖²`` so that the dense ``W + s·BA`` is never
  built: ``⟨W, BA⟩`` needs ``Wᵀ·A`` (a rank-r product) and ``‖BA‖²`` needs ``AᵀA`` (r×r).
  Returns the norm and its labels (``output_labels(v)``).
  """
  w = dense_base(v).astype(jnp.float32)
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  outs = output_labels(v)
  in_set = set(input_labels(v))
  al, bl = list(v.a_labels), list(v.b_labels)
  w_sq = _einsum([v.labels, v.labels], outs, w, w)
  wa = _einsum([v.labels, al], outs + [RANK], w, a)  # Wᵀ·A: (outputs..., r)
  cross = _einsum([outs + [RANK], bl], outs, wa, b)
  r2 = new_label()
  al2 = [r2 if l == RANK else l for l in al]
  bl2 = [r2 if l == RANK else l for l in bl]
  batch_a = [l for l in al if l not in in_set and l != RANK]
  ata = _einsum([al, al2], batch_a + [RANK, r2], a, a)  # AᵀA: (stacked..., r, r)
  ba_sq = _einsum([batch_a + [RANK, r2], bl, bl2], outs, ata, b, b)
  s = jnp.asarray(scale, jnp.float32)
  n_sq = w_sq + 2.0 * s * cross + s * s * ba_sq
  return jnp.sqrt(jnp.maximum(n_sq, 0.0)), outs
