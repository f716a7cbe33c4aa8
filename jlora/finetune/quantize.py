"""The fine-tuning command's QLoRA options: ``--quantize``, ``--no-double-quant``, ``--quant-blocksize``.

``train.py`` calls ``quantize_base`` once, right after the base has loaded: the
linear kernels (every kernel of ``loaded.layout`` that is neither an embedding
nor ``lm_head``) become ``jlora.NF4Weight`` nodes in bitsandbytes' format, laid
out as the model's layout says (stacked ``(layers, in, out)`` kernels stay
stacked, so the scanned layers decode one layer at a time) and, on a mesh,
sharded by the same preset as the dense base. A pre-quantized ``*-bnb-4bit``
``--model`` already holds ``NF4Weight`` kernels and trains as it is.

The base fingerprint is computed by the caller before quantizing; it equals the
fingerprint of the 4-bit base (``jlora.fingerprint`` reads the NF4 codes), so
adapters trained with and without ``--quantize`` load onto either base.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax

import jlora
from jlora._tree import leaves_with_paths
from jlora.finetune import distributed
from jlora.finetune.cli import UserError
from jlora.finetune.options import ModelOptions
from jlora.quant._weight import is_nf4

Params = Any
_HEADS = re.compile(r"(.*/)?(lm_head|embed_out)/kernel")


def linear_kernels(layout: Mapping[str, jlora.KernelLayout]) -> list[str]:
  """Paths of the kernels ``--quantize`` stores in 4 bits: not embeddings, not the output head.

  Example:
    >>> import jlora
    >>> from jlora.finetune.quantize import linear_kernels
    >>> linear_kernels({"mlp/up/kernel": jlora.KernelLayout(in_axes=(0,)), "lm_head/kernel":
    ...   jlora.KernelLayout(in_axes=(0,)), "emb": jlora.KernelLayout(in_axes=(0,), embedding=True)})
    ['mlp/up/kernel']
  """
  return sorted(p for p, lay in layout.items() if not lay.embedding and not _HEADS.fullmatch(p))


def _formats(params: Params) -> dict[str, Any]:
  return {path: x.format for path, x in leaves_with_paths(params, is_leaf=is_nf4)
          if isinstance(x, jlora.NF4Weight)}


def describe(params: Params, *, source: str) -> dict[str, Any] | None:
  """What the run records about its 4-bit base (adapter metadata, summary), or None for a dense base.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> from jlora.finetune.quantize import describe
    >>> describe(jlora.quantize({"w": jnp.ones((64, 8))}, targets="w"), source="--quantize")["quant_type"]
    'nf4'
  """
  formats = _formats(params)
  if not formats:
    return None
  f = next(iter(formats.values()))
  nodes = [x for x in jax.tree.leaves(params, is_leaf=is_nf4) if isinstance(x, jlora.NF4Weight)]
  return {"source": source, "quant_type": f.quant_type, "blocksize": f.blocksize, "double_quant": f.double_quant,
          "stored_dtype": f.dtype, "compute_dtype": f.decode_dtype, "kernels": sorted(formats),
          "bits_per_parameter": round(jlora.quant.storage_bits(nodes), 4)}


def quantize_base(cfg: ModelOptions, base_params: Params, layout: Mapping[str, jlora.KernelLayout], mesh, *,
                  model_id: str) -> tuple[Params, dict[str, Any] | None]:
  """The base to train on (4-bit with ``--quantize``) and its description (``describe``).

  Raises:
    UserError: ``--quantize`` on a model with no linear kernel to quantize, or on a
      pre-quantized model in another format.
  """
  formats = _formats(base_params)
  if formats:  # a pre-quantized *-bnb-4bit checkpoint
    f = next(iter(formats.values()))
    if cfg.quantize != "none" and (cfg.quantize, cfg.double_quant, cfg.quant_blocksize) != (
        f.quant_type, f.double_quant, f.blocksize):
      raise UserError(f"--quantize {cfg.quantize}: --model {model_id} is already quantized ({f.quant_type}, "
                      f"blocksize {f.blocksize}, double_quant {str(f.double_quant).lower()}) and trains in 4 bits "
                      "as it is; drop --quantize (or give the unquantized model)")
    return base_params, describe(base_params, source="checkpoint")
  if cfg.quantize == "none":
    return base_params, None
  paths = linear_kernels(layout)
  if not paths:
    raise UserError(f"--quantize {cfg.quantize}: {model_id} has no linear kernels to quantize (only embeddings "
                    "or an output head, which stay in 16/32 bits); drop --quantize")
  try:
    qparams = jlora.quantize(base_params, targets=[re.escape(p) for p in paths], quant_type=cfg.quantize,
                             blocksize=cfg.quant_blocksize, double_quant=cfg.double_quant, layout=layout)
  except ValueError as e:  # jlora.quantize's checks of this model's kernels
    raise UserError(f"--quantize {cfg.quantize} on {model_id}: {e}") from None
  if mesh is not None:  # the stored arrays sharded like their kernels, by the run's preset
    qparams = distributed.place(qparams, cfg, mesh)
  return qparams, describe(qparams, source="--quantize")
