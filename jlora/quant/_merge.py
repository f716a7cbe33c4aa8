"""``merge_quantized``: fold adapters into their 4-bit bases and quantize the result again."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jlora._lazy import dense
from jlora._merge import merge
from jlora._tree import leaves_with_paths, path_str
from jlora._weight import is_lora_weight, is_node
from jlora.quant._api import _encoder
from jlora.quant._weight import NF4Weight, is_nf4

Params = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundingError:
  """What re-quantizing a merged kernel lost, measured against the exact float32 merge."""

  max_abs: float  # max |deq(Q') - (deq(Q) + ΔW)|
  rms: float  # root mean square of the same difference
  relative_to_delta: float  # ‖deq(Q') - (deq(Q) + ΔW)‖ / ‖ΔW‖ (Frobenius); inf when ΔW = 0 and the error is not


def merge_quantized(params: Params) -> tuple[Params, dict[str, RoundingError]]:
  """Folds each adapter over an ``NF4Weight`` into it and quantizes the sum back to 4 bits.

  ``jlora.merge`` returns dense kernels; this is the explicit alternative that
  keeps the base in its 4-bit format (same blocksize, quant type and double
  quantization). The merge is exact in float32 (``deq(Q) + ΔW``) and quantized
  from float32; a rank-r update is mostly far below one NF4 step, so much of it is
  rounded away: the returned ``RoundingError`` per path says how much. Adapters
  over dense kernels are merged as ``jlora.merge`` does; other leaves stay.

  Returns:
    ``(params, {path: RoundingError})``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> qp = jlora.quantize({"w": jax.random.normal(jax.random.key(0), (128, 64))}, targets="w")
    >>> lp = jlora.init(jax.random.key(1), qp, jlora.LoraConfig(rank=4, targets="w"))
    >>> lp = {"w": lp["w"].replace(b=jnp.ones((4, 64)))}
    >>> merged, errors = jlora.merge_quantized(lp)
    >>> isinstance(merged["w"], jlora.NF4Weight), errors["w"].relative_to_delta > 0
    (True, True)
  """
  errors: dict[str, RoundingError] = {}

  def fold(path, x):
    if not (is_lora_weight(x) and is_nf4(x.w0)):
      return merge(x) if is_lora_weight(x) else x
    if not x.is_complete:
      raise ValueError(f"jlora.merge_quantized: {path_str(path)!r} is an incomplete LoraWeight; combine the "
                       "split halves first.")
    fmt = x.w0.format
    base = dense(x.w0, jnp.float32)
    merged = x.spec.variant.merged(x, base)
    node = NF4Weight.from_storage(_encoder(fmt)(merged), fmt)
    err = node.dequantize(jnp.float32) - merged
    delta_norm = float(jnp.linalg.norm((merged - base).reshape(-1)))
    err_norm = float(jnp.linalg.norm(err.reshape(-1)))
    errors[path_str(path)] = RoundingError(
        max_abs=float(jnp.max(jnp.abs(err))), rms=float(jnp.sqrt(jnp.mean(err * err))),
        relative_to_delta=err_norm / delta_norm if delta_norm else (0.0 if err_norm == 0 else float("inf")))
    return node

  out = jax.tree_util.tree_map_with_path(fold, params, is_leaf=is_node)
  if not errors and not any(is_lora_weight(x) for _, x in leaves_with_paths(params, is_leaf=is_node)):
    raise ValueError("jlora.merge_quantized: the tree holds no adapter; create adapters with jlora.init first.")
  return out, errors
