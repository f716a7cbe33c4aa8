"""gpt-oss' MXFP4 expert weights (``*_blocks`` / ``*_scales``), decoded on load.

The released gpt-oss checkpoints store each layer's two expert matrices in the
OCP microscaling FP4 format (``config.json``: ``quantization_config.quant_method
= "mxfp4"``; transformers ``integrations/mxfp4.py``):

* ``<name>_blocks``: uint8 ``(E, out, in / 32, 16)``, two FP4 (e2m1) codes per
  byte, the **low nibble first** (element ``2j`` is ``byte & 0xF``, ``2j + 1`` is
  ``byte >> 4``). Codes 0-7 are ``0, 0.5, 1, 1.5, 2, 3, 4, 6``; bit 3 is the sign;
* ``<name>_scales``: uint8 ``(E, out, in / 32)``, one E8M0 exponent per block of
  32 values: the block is multiplied by ``2 ** (scale - 127)``.

Rows are the output features; decoding gives ``(E, out, in)`` and a transpose the
module's ``(E, in, out)`` (``gate_up_proj``'s columns still interleaved gate/up).
Every decoded value is a 3-bit mantissa times a power of two, so float32 and
bfloat16 hold it exactly: decoding to the compute dtype equals transformers'
``convert_moe_packed_tensors`` (bfloat16). jlora keeps the decoded kernels
(``save`` writes the dense layout).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np

BLOCK = 32
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)
SUFFIXES = ("_blocks", "_scales")


def entries(readers: Mapping[str, Callable[[], np.ndarray]], weight_names: Iterable[str]) -> dict[str, tuple[str, str]]:
  """``{weight name: (blocks key, scales key)}`` for the weights the checkpoint stores in MXFP4."""
  out = {}
  for name in weight_names:
    if name not in readers and all(name + s in readers for s in SUFFIXES):
      out[name] = (name + "_blocks", name + "_scales")
  return out


def decode(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """float32 ``(E, in, out)`` from MXFP4 ``blocks (E, out, G, 16)`` and ``scales (E, out, G)``.

  Example:
    >>> import numpy as np
    >>> from jlora.models._mxfp4 import decode
    >>> blocks = np.zeros((1, 1, 1, 16), np.uint8); blocks[0, 0, 0, 0] = 0x92  # codes 2 (1.0), then 9 (-0.5)
    >>> decode(blocks, np.full((1, 1, 1), 128, np.uint8))[0, :3, 0].tolist()  # scale 2 ** (128 - 127)
    [2.0, -1.0, 0.0]
  """
  blocks, scales = np.asarray(blocks), np.asarray(scales)
  if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
    raise ValueError(f"MXFP4 blocks and scales are uint8, got {blocks.dtype} and {scales.dtype}")
  if blocks.ndim != 4 or blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
    raise ValueError(f"MXFP4 blocks (E, rows, G, 16) and scales (E, rows, G) do not fit: {blocks.shape}, "
                     f"{scales.shape}")
  codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1)  # low nibble first
  values = FP4_VALUES[codes].reshape(*scales.shape, BLOCK)
  values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
  e, rows, groups = scales.shape
  return np.ascontiguousarray(values.reshape(e, rows, groups * BLOCK).transpose(0, 2, 1))
