"""A storage-independent digest of a kernel's values, for ``jlora.fingerprint``.

A kernel is identified by the NF4 codes (blocksize 64, bitsandbytes' rounding) of
about ``samples / 64`` evenly spaced blocks of its PyTorch ``[out, in]``
flattening, taking a ``(..., in, out)`` kernel's leading axes as stacked layers.
A dense kernel computes them from its values; an ``NF4Weight`` of that layout and
blocksize reads them from its packed bytes. Because ``jlora.quantize`` is bit-exact,
both give the same digest: an adapter trained over the 4-bit base loads onto the
bfloat16 base and vice versa. (Codes ignore a per-block rescaling of the weights,
and the absmaxes, which double quantization approximates.)

``jlora.fingerprint`` lives in the core (``jlora._checkpoint``), below this
package: importing this module registers ``kernel_digest`` there.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jlora._checkpoint import register_kernel_digest
from jlora.quant import _codebook

BLOCK = 64


def _plan(shape: tuple[int, ...], samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(layer, position, valid)`` of the sampled blocks: ``(k,)``, ``(k, 64)``, ``(k, 64)``.

  Positions index one layer's row-major ``[out, in]`` flattening."""
  layers = int(np.prod(shape[:-2], dtype=np.int64))
  n = int(shape[-2]) * int(shape[-1])
  nb = -(-n // BLOCK)
  total = layers * nb
  k = max(1, min(total, samples // BLOCK))
  t = (np.arange(k, dtype=np.int64) * total) // k
  layer, block = t // nb, t % nb
  pos = block[:, None] * BLOCK + np.arange(BLOCK, dtype=np.int64)[None, :]
  valid = pos < n
  return layer, np.where(valid, pos, n - 1), valid


def _gather(x: Any, index: tuple) -> np.ndarray:
  out = x[index]
  if isinstance(out, jax.Array) and not out.is_fully_addressable:
    from jax.experimental import multihost_utils

    out = multihost_utils.process_allgather(out, tiled=True)
  return np.asarray(jax.device_get(out))


def _header(shape: tuple[int, ...], dtype: Any) -> bytes:
  return f"{tuple(shape)}|{np.dtype(dtype).name}|nf4-codes;".encode()


def _codes(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """NF4 codes of blocks (rows; ``valid`` marks a partial block's elements), as bitsandbytes."""
  v = np.where(valid, values.astype(np.float32), np.float32(0))
  am = np.abs(v).max(axis=1)
  full = valid.all(axis=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    # Full blocks: x * (1 / absmax); a partial (trailing) block: x / absmax; zero blocks: 0.
    scaled = np.where(full[:, None], v * (np.float32(1) / am)[:, None], v / am[:, None]).astype(np.float32)
  scaled = np.clip(np.where((am > 0)[:, None], scaled, np.float32(0)), -1, 1)
  mid, _ = _codebook.bounds("nf4")
  return np.where(valid, np.searchsorted(mid, scaled, side="left"), 0).astype(np.uint8)


def kernel_digest(x: Any, samples: int) -> bytes:
  """Digest of a dense floating kernel with at least 2 axes (array or ``ShapeDtypeStruct``).

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.quant._fingerprint import kernel_digest
    >>> kernel_digest(jnp.ones((4, 4)), 1024)[-16:] == bytes([15] * 16)
    True
  """
  shape = tuple(x.shape)
  head = _header(shape, x.dtype)
  if isinstance(x, jax.ShapeDtypeStruct):
    return head
  layer, pos, valid = _plan(shape, samples)
  n_in = shape[-2]
  lead = np.unravel_index(layer, shape[:-2]) if len(shape) > 2 else ()
  index = (*(li[:, None] for li in lead), pos % n_in, pos // n_in)
  return head + _codes(_gather(x, index), valid)[valid].tobytes()


def nf4_digest(w: Any, samples: int) -> bytes:
  """Digest of an ``NF4Weight``: equal to ``kernel_digest`` of its original dense kernel when it
  is laid out ``(..., in, out)`` with NF4 blocks of 64 (otherwise a digest of its own codes)."""
  f = w.format
  shape = f.shape
  nd = len(shape)
  canonical = f.stack == nd - 2 and f.in_axes == (nd - 2,) and f.blocksize == BLOCK and f.quant_type == "nf4"
  head = _header(shape, f.dtype)
  if not canonical:
    head += f"|{f.quant_type}/{f.blocksize}/in{f.in_axes}/stack{f.stack};".encode()
  if any(isinstance(v, jax.ShapeDtypeStruct) for v in w.storage.values()):
    return head
  layer, pos, valid = _plan(shape if canonical else (*f.stack_shape, f.n_in, f.n_out), samples)
  packed = w.packed.reshape(int(np.prod(f.stack_shape, dtype=np.int64)), -1)
  byte = _gather(packed, (layer[:, None], pos // 2))
  codes = np.where(pos % 2 == 0, byte >> 4, byte & 15).astype(np.uint8)
  return head + codes[valid].tobytes()


register_kernel_digest(kernel_digest)
