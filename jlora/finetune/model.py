"""Loading the base model and tokenizer for the fine-tuning and generation commands.

Llama, Mistral, Qwen2/3 and Gemma 1/2/3 checkpoints run on ``jlora.models``'
native decoder (safetensors, no transformers model class); the tokenizer comes
from ``transformers.AutoTokenizer`` (4.57 or 5.x). Other architectures (GPT-2,
GPT-J, OPT, ...) fall back to transformers 4.x's Flax classes when those are
installed (``jlora.finetune.hf_flax``).
"""

from __future__ import annotations

import os

import jax
import numpy as np

import jlora.models
from jlora.finetune import hf_flax
from jlora.finetune.loaded import (GENERATE_BATCH, LoadedModel, MissingWeightsError,  # noqa: F401  (re-exported)
                                   UnsupportedModelError, load_tokenizer, model_type_of)


def load(model_dir: str, *, bf16: bool = False, remat: bool = False, model_id: str | None = None,
         mesh: jax.sharding.Mesh | None = None, sharding: str | None = None) -> LoadedModel:
  """Loads a causal-LM directory: natively for supported families, else via transformers' Flax classes.

  Args:
    model_dir: a Hugging Face model directory.
    bf16: parameters and compute in bfloat16.
    remat: per-layer rematerialisation (native: each layer keeps only its input).
    model_id: the name recorded in checkpoints (default: ``model_dir``).
    mesh, sharding: place the native parameters directly onto a device mesh with a
      ``jlora.sharding`` preset.

  Raises:
    FileNotFoundError: the directory, its config or its weights are missing.
    UnsupportedModelError: an architecture neither the native decoder nor an
      installed transformers Flax class can run.
    MissingWeightsError: the checkpoint lacks some of the model's weights.
  """
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"--model {model_dir!r} is not a directory (offline: a local Hugging Face "
                            "model directory with config.json and weights is needed)")
  model_type = model_type_of(model_dir)
  tokenizer = load_tokenizer(model_dir)
  model_id = model_id or model_dir
  if model_type not in jlora.models.SUPPORTED_MODEL_TYPES:
    return hf_flax.load(model_dir, bf16=bf16, remat=remat, tokenizer=tokenizer, model_id=model_id)
  model, params = jlora.models.load(model_dir, dtype="bfloat16" if bf16 else "float32",
                                    remat="full" if remat else "none", mesh=mesh,
                                    sharding=sharding if mesh is not None else None)

  def forward(p, ids, attention_mask, segment_ids=None):
    return model(p, ids, attention_mask=attention_mask, segment_ids=segment_ids)

  return LoadedModel(model=model, params=params, tokenizer=tokenizer, model_id=model_id, forward=forward,
                     layout=model.layout, module_map=model.module_map, model_type=model_type,
                     max_positions=model.config.max_position_embeddings)


def base_bytes(params) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


def save_pretrained(loaded: LoadedModel, directory: str, params) -> str:
  """``loaded.save_pretrained(directory, params)`` (kept as a function for scripts)."""
  return loaded.save_pretrained(directory, params)

