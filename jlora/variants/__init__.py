"""The LoRA family beyond plain LoRA: DoRA, AdaLoRA, PiSSA/OLoRA initialisation, LoRA
extraction and LoRA+, each a small addition to the same pytree transform.

* ``DoRA`` — ``jlora.LoraConfig(dora=True)``: a trained magnitude per output feature.
* ``AdaLoRA`` — SVD-form adapters; ``adalora`` (the rank allocator, an optax
  transformation), ``orthogonality_penalty``, ``adalora_finalize``, ``rank_pattern``.
* ``init="pissa" | "pissa_niter_K" | "olora"`` — ``Residual`` adapters on the
  residual base; ``to_lora`` converts them (and AdaLoRA) to plain LoRA.
* ``extract`` — a LoRA from a fine-tuned model by truncated SVD of ΔW.
* LoRA+ — ``jlora.optimizer(..., loraplus_ratio=16)``, ``loraplus_labels``, ``loraplus_scale``.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> cfg = jlora.LoraConfig(rank=2, targets="w", dora=True)
  >>> type(jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4))}, cfg)["w"].spec.variant).__name__
  'DoRA'
"""

from jlora._loraplus import loraplus_labels
from jlora._loraplus import loraplus_scale
from jlora.variants._adalora import AdaLoRA
from jlora.variants._adalora import orthogonality_penalty
from jlora.variants._adalora import rank_pattern
from jlora.variants._allocator import AdaLoraState
from jlora.variants._allocator import adalora
from jlora.variants._allocator import adalora_finalize
from jlora.variants._convert import merge_adapters
from jlora.variants._convert import to_lora
from jlora.variants._dora import DoRA
from jlora.variants._extract import Extraction
from jlora.variants._extract import extract
from jlora.variants._residual import Residual

__all__ = [
    "AdaLoRA",
    "AdaLoraState",
    "DoRA",
    "Extraction",
    "Residual",
    "adalora",
    "adalora_finalize",
    "extract",
    "loraplus_labels",
    "loraplus_scale",
    "merge_adapters",
    "orthogonality_penalty",
    "rank_pattern",
    "to_lora",
]
