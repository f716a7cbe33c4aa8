"""Blockwise quantizers of bitsandbytes, in JAX: 4-bit NF4/FP4 and the 8-bit dynamic map.

All functions take one matrix flattened row-major in PyTorch's ``[out, in]``
order (``x`` of shape ``(n,)``) and compute in float32 whatever the input
dtype, with the arithmetic of bitsandbytes 0.50's CPU/default kernels:

* 4-bit (``quantize_4bit``): full blocks are scaled by ``x * (1 / absmax)``, a
  trailing partial block by ``x / absmax``; codes are the nearest value with
  ties to the lower index (``bucketize`` on float32 midpoints); an all-zero
  block encodes to the code of 0; two codes per byte, the first in the high
  nibble, an odd count padded with the code of 0.
* 8-bit dynamic (``quantize_dynamic``, the double quantization of the block
  absmaxes): the native CPU path of ``quantize_blockwise``, which divides by the
  block absmax, searches the map with its first entry set to -1, and keeps the
  upper neighbour only when it is strictly closer in float32.

The results are bit-identical to bitsandbytes on IEEE float32 hardware (CPU,
GPU); TPUs compute float32 division approximately, so quantize on the host
there when bit compatibility matters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora.quant import _codebook

NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for the double quantization of absmaxes
_TINY = np.float32(1e-38)  # bitsandbytes clamps a zero absmax to this (float32, subnormal)


def num_blocks(n: int, blocksize: int) -> int:
  return -(-n // blocksize)


def _nearest_4bit(scaled: jax.Array, quant_type: str) -> jax.Array:
  """4-bit index of each value in [-1, 1]: ``order[#(midpoints < v)]``."""
  mid, order = _codebook.bounds(quant_type)
  idx = jnp.sum(scaled[..., None] > jnp.asarray(mid), axis=-1, dtype=jnp.int32)
  if quant_type != "nf4":
    idx = jnp.asarray(order)[idx].astype(jnp.int32)
  return idx.astype(jnp.uint8)


def quantize_4bit(x: jax.Array, blocksize: int, quant_type: str = "nf4") -> tuple[jax.Array, jax.Array]:
  """``(packed uint8 (ceil(n/2),), absmax float32 (ceil(n/blocksize),))`` of a flat matrix.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.quant._blockwise import quantize_4bit
    >>> packed, absmax = quantize_4bit(jnp.linspace(-1.0, 1.0, 64), 64)
    >>> int(packed[0] >> 4), int(packed[-1] & 15), float(absmax[0])
    (0, 15, 1.0)
  """
  x = jnp.asarray(x).astype(jnp.float32).reshape(-1)
  n = x.shape[0]
  rem = n % blocksize
  full = n - rem
  parts, absmaxes = [], []
  if full:
    head = x[:full].reshape(-1, blocksize)
    am = jnp.max(jnp.abs(head), axis=1)
    # bitsandbytes: head * (1 / absmax.clamp(min=1e-38)); a zero block scales to 0 (also under
    # flush-to-zero, where the subnormal clamp would turn into 1/0).
    inv = jnp.where(am > 0, jnp.float32(1.0) / jnp.where(am > 0, am, 1.0), 0.0)
    parts.append(jnp.clip(head * inv[:, None], -1.0, 1.0).reshape(-1))
    absmaxes.append(am)
  if rem:
    tail = x[full:]
    am = jnp.max(jnp.abs(tail))
    # bitsandbytes divides the trailing block by its absmax clamped to 1e-38 and stores the clamp.
    parts.append(jnp.where(am > 0, jnp.clip(tail / jnp.where(am > 0, am, 1.0), -1.0, 1.0), 0.0))
    absmaxes.append(jnp.where(am > 0, am, _tiny())[None])
  scaled = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
  if n % 2:
    scaled = jnp.pad(scaled, (0, 1))
  q = _nearest_4bit(scaled, quant_type)
  packed = (q[0::2] << 4) | q[1::2]
  absmax = jnp.concatenate(absmaxes) if len(absmaxes) > 1 else absmaxes[0]
  return packed, absmax


def _tiny() -> jax.Array:
  """float32 1e-38 (subnormal) built from its bits, so that flush-to-zero cannot alter it."""
  return lax.bitcast_convert_type(jnp.uint32(_TINY.view(np.uint32)), jnp.float32)


def unpack(packed: jax.Array, n: int) -> jax.Array:
  """The 4-bit indices (uint8, last axis ``n``) of packed bytes (last axis ``ceil(n/2)``)."""
  q = jnp.stack([packed >> 4, packed & 15], axis=-1)
  q = q.reshape(*packed.shape[:-1], 2 * packed.shape[-1])
  return q[..., :n] if q.shape[-1] != n else q


def scale_blocks(values: jax.Array, absmax: jax.Array, blocksize: int) -> jax.Array:
  """``values[..., i] * absmax[..., i // blocksize]`` in float32 (last axis blocked)."""
  n = values.shape[-1]
  nb = absmax.shape[-1]
  pad = nb * blocksize - n
  v = jnp.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, pad)]) if pad else values
  v = v.reshape(*values.shape[:-1], nb, blocksize) * absmax[..., None]
  v = v.reshape(*values.shape[:-1], nb * blocksize)
  return v[..., :n] if pad else v


def _dynamic_lut() -> np.ndarray:
  """bitsandbytes' CPU lookup table (``build_quantize_lut`` in ``csrc/cpu_ops.cpp``): cell ``i`` of
  65,536 equal cells over [-1, 1] holds the index of the code nearest to ``-1 + 2i/65535``."""
  c = _codebook.DYNAMIC
  mid = (np.float32(0.5) * (c[:-1] + c[1:])).astype(np.float32)
  i = np.arange(_LUT_SIZE).astype(np.float32)
  val = (np.float32(-1.0) + ((np.float32(2.0) * i) / np.float32(_LUT_SIZE - 1)).astype(np.float32)).astype(np.float32)
  return np.searchsorted(mid, val, side="left").astype(np.uint8)


_LUT_SIZE = 65536
_LUT = _dynamic_lut()


def quantize_dynamic(x: jax.Array, blocksize: int = NESTED_BLOCKSIZE) -> tuple[jax.Array, jax.Array]:
  """``(codes uint8 (n,), absmax float32 (ceil(n/blocksize),))``: bitsandbytes' CPU 8-bit blockwise.

  Matches ``quantize_blockwise`` with the default signed dynamic map on CPU
  (bitsandbytes 0.50, ``csrc/cpu_ops.cpp``) bit for bit: ``v = x * (1 / absmax)``
  clamped to [-1, 1] selects one of 65,536 equal cells,
  ``trunc((v + 1) / 2 * 65535 + 0.5)``, and the cell's precomputed nearest code.
  The cells make it differ from the nearest code near midpoints and around 0
  (0 itself maps to code 131, +1.5e-5, as in bitsandbytes; the CUDA kernel rounds
  to the nearest code); a block whose absmax is 0 gets code index 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.quant._blockwise import quantize_dynamic
    >>> codes, absmax = quantize_dynamic(jnp.array([-2.0, 0.0, 1.0, 2.0]))
    >>> codes.tolist(), absmax.tolist()
    ([0, 131, 219, 255], [2.0])
  """
  x = jnp.asarray(x, jnp.float32).reshape(-1)
  n = x.shape[0]
  nb = num_blocks(n, blocksize)
  pad = nb * blocksize - n
  # Padding with 0 changes no block's absmax (|x| >= 0) and is cut off below.
  blocks = jnp.pad(x, (0, pad)).reshape(nb, blocksize)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  inv = jnp.float32(1.0) / jnp.where(absmax > 0, absmax, 1.0)
  v = jnp.clip(blocks * inv[:, None], -1.0, 1.0)
  t = (v + jnp.float32(1.0)) * jnp.float32(0.5)
  # (t * 65535 + 0.5 rounds identically with or without a fused multiply-add for every
  # float32 t in [0, 1]: checked exhaustively.)
  cell = (t * jnp.float32(_LUT_SIZE - 1) + jnp.float32(0.5)).astype(jnp.int32)
  idx = jnp.asarray(_LUT)[jnp.clip(cell, 0, _LUT_SIZE - 1)]
  idx = jnp.where((absmax > 0)[:, None], idx, jnp.uint8(0))
  return idx.reshape(-1)[:n], absmax


def dequantize_dynamic(codes: jax.Array, absmax: jax.Array, offset: jax.Array,
                       blocksize: int = NESTED_BLOCKSIZE) -> jax.Array:
  """``code[q] * absmax[i // blocksize] + offset`` in float32 (the nested absmax decode)."""
  values = jnp.asarray(_codebook.DYNAMIC)[codes.astype(jnp.int32)]
  scaled = scale_blocks(values, absmax, blocksize)
  # bitsandbytes rounds the product, then adds the offset (two roundings). XLA's CPU backend
  # contracts `a * b + c` into one fused multiply-add (one rounding) and drops optimization
  # barriers and no-op reduce_precision; a select on the product keeps it apart. (Only a NaN
  # product, which no finite absmax gives, would become 0.)
  scaled = jnp.where(scaled == scaled, scaled, jnp.float32(0))
  return scaled + jnp.asarray(offset, jnp.float32)[..., None]


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``a + b`` as a float32 ``s`` and its exact rounding error ``e`` (Knuth's TwoSum)."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _two_prod(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``a * b`` as a float32 ``p`` and its exact rounding error (Dekker's product; no FMA needed)."""
  def split(v):
    c = jnp.float32(4097.0) * v  # 2^12 + 1 splits a 24-bit significand into two 12-bit halves
    hi = c - (c - v)
    return hi, v - hi

  p = a * b
  ah, al = split(a)
  bh, bl = split(b)
  return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def mean_f32(x: jax.Array) -> jax.Array:
  """The mean of a float32 vector, correctly rounded (bitsandbytes: ``absmax.mean()``).

  The sum is compensated (Neumaier) and kept as a float32 pair ``hi + lo`` (error below
  ``n·2^-48`` of the sum), the division by ``n`` is refined with the exact remainder
  ``hi - q·n`` (TwoProduct), so the result is the float32 nearest the exact mean except
  within ``~n·2^-48`` of a rounding midpoint. ``n`` passes an optimization barrier: XLA
  would otherwise rewrite ``/ n`` as ``* (1/n)``, a second rounding (1 ulp off in a third
  of random layers), and the result passes one too, so that every use of it (the stored
  offset, the subtraction before the nested quantization) is the same value.
  """
  x = jnp.asarray(x, jnp.float32).reshape(-1)

  def combine(a, b):
    (s1, c1), (s2, c2) = a, b
    t = s1 + s2
    e = jnp.where(jnp.abs(s1) >= jnp.abs(s2), (s1 - t) + s2, (s2 - t) + s1)
    return t, c1 + c2 + e

  s, c = lax.reduce((x, jnp.zeros_like(x)), (jnp.float32(0), jnp.float32(0)), combine, (0,))
  hi, lo = _two_sum(s, c)
  n = lax.optimization_barrier(jnp.float32(x.shape[0]))
  q = hi / n
  p, p_err = _two_prod(q, n)
  remainder = ((hi - p) - p_err) + lo  # hi - q*n is exact in float32 (Sterbenz), then the small terms
  return lax.optimization_barrier(q + remainder / n)
