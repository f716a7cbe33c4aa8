"""Native JAX decoders for modern open LLMs, loaded from Hugging Face safetensors.

One parametric, layer-scanned decoder covers Llama 2/3.x, Mistral, Qwen2/3 and
Gemma 1/2/3 (text), and the mixture-of-experts families Mixtral, Qwen2-MoE,
Qwen3-MoE and gpt-oss; every family is verified against PyTorch transformers.

Example:
  >>> import jax, jax.numpy as jnp, jlora.models
  >>> cfg = jlora.models.ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
  ...   "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4})
  >>> model = jlora.models.Decoder(cfg)
  >>> model(model.init(jax.random.key(0)), jnp.array([[1, 2, 3]])).shape
  (1, 3, 64)
"""

import os as _os

from jlora.models.config import SUPPORTED_MODEL_TYPES
from jlora.models.config import ModelConfig
from jlora.models.config import RopeConfig
from jlora.models.decoder import Decoder
from jlora.models.generate import generate
from jlora.models.io import CheckpointError
from jlora.models.io import load
from jlora.models.io import read_config
from jlora.models.io import save
from jlora.models.moe import load_balancing_loss

# The bundled 1M-parameter Llama (pretrained on the CPython docs), a directory like any HF checkpoint.
TINY_BASE: str = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "assets", "tiny-base")

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "TINY_BASE",
    "CheckpointError",
    "Decoder",
    "ModelConfig",
    "RopeConfig",
    "generate",
    "load",
    "load_balancing_loss",
    "read_config",
    "save",
]
