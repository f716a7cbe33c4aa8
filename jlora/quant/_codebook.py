"""The code books of bitsandbytes: NF4 / FP4 (4-bit) and the signed 8-bit dynamic map.

Every table is float32, built with bitsandbytes' own float32 arithmetic so that
encoding decisions (midpoints, nearest code) agree bit for bit.
"""

from __future__ import annotations

import numpy as np

QUANT_TYPES = ("nf4", "fp4")

# ``get_4bit_type("nf4")``: quantiles of N(0, 1), ``create_normal_map(offset=0.9677083)``.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], np.float32)

# ``get_4bit_type("fp4")``: sign, 2 exponent bits, 1 mantissa bit, in bit-pattern order,
# divided by the largest magnitude (12).
FP4 = (np.array([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
                np.float32) / np.float32(12.0)).astype(np.float32)


def code(quant_type: str) -> np.ndarray:
  """The 16 float32 values a 4-bit index decodes to (index order).

  Example:
    >>> from jlora.quant._codebook import code
    >>> float(code("nf4")[7]), float(code("fp4")[3])
    (0.0, 1.0)
  """
  if quant_type == "nf4":
    return NF4
  if quant_type == "fp4":
    return FP4
  raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}.")


def bounds(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
  """``(midpoints, order)``: a value ``v`` encodes to ``order[#(midpoints < v)]`` (ties go down).

  ``order`` sorts the code (identity for NF4; FP4 lists ``0`` before ``-0``, as a stable
  sort does); midpoints are float32 means of neighbouring sorted values.
  """
  c = code(quant_type)
  order = np.argsort(c, kind="stable")
  s = c[order]
  mid = ((s[:-1] + s[1:]) / np.float32(2)).astype(np.float32)
  return mid, order.astype(np.uint8)


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """``torch.linspace(start, end, steps, dtype=float32)`` on CPU: a float32 step, each value
  ``start + step·i`` (first half) or ``end - step·(steps-1-i)`` rounded once (a fused multiply-add)."""
  start32, end32 = np.float32(start), np.float32(end)
  step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
  i = np.arange(steps, dtype=np.float64)
  lo = np.float64(start32) + step * i
  hi = np.float64(end32) - step * (steps - 1 - i)
  return np.where(i < steps // 2, lo, hi).astype(np.float32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
  """bitsandbytes' ``create_dynamic_map``: the 256-value "dynamic tree" map of Dettmers (2015).

  This is the default code of ``quantize_blockwise`` and hence of double
  quantization (the block absmaxes minus their mean). It is not FP8.

  Example:
    >>> from jlora.quant._codebook import dynamic_map
    >>> m = dynamic_map()
    >>> m.shape, float(m[-1]), bool((m[1:] >= m[:-1]).all())
    ((256,), 1.0, True)
  """
  data: list[float] = []
  non_sign_bits = total_bits - 1
  additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
  for i in range(max_exponent_bits):
    items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else 2 ** (
        i + non_sign_bits - max_exponent_bits + 1) + 1
    b = _linspace_f32(0.1, 1, items)
    means = ((b[:-1] + b[1:]) / np.float32(2.0)).astype(np.float32)
    scale = np.float32(10 ** (-(max_exponent_bits - 1) + i))
    data += (scale * means).astype(np.float32).tolist()
    if signed:
      data += (-scale * means).astype(np.float32).tolist()
  if additional_items > 0:
    b = _linspace_f32(0.1, 1, additional_items + 1)
    means = ((b[:-1] + b[1:]) / np.float32(2.0)).astype(np.float32)
    scale = np.float32(10 ** (-(max_exponent_bits - 1) + i))
    data += (scale * means).astype(np.float32).tolist()
    if signed:
      data += (-scale * means).astype(np.float32).tolist()
  data += [0.0, 1.0]
  data += [0.0] * (2 ** total_bits - len(data))
  return np.array(sorted(data), np.float32)


DYNAMIC = dynamic_map()
