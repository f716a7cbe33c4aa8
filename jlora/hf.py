"""Hugging Face model directories for PyTorch: Flax parameters -> ``model.safetensors``.

transformers' Flax models name their parameters after the PyTorch modules, so
the conversion is mechanical: ``/`` becomes ``.``, ``kernel`` becomes a
transposed ``weight`` (both ``nn.Dense`` ``(in, out)`` -> ``nn.Linear``
``(out, in)`` and GPT-2's Flax ``(out, in)`` -> PyTorch ``Conv1D`` ``(in, out)``),
``embedding`` and ``scale`` become ``weight``. Tied output embeddings are left
to transformers to re-tie on load.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from jlora._tree import leaves_with_paths
from jlora._weight import is_lora_weight

WEIGHTS_NAME = "model.safetensors"
_RENAME = {"kernel": "weight", "embedding": "weight", "scale": "weight", "weight": "weight", "bias": "bias"}


def to_torch_state_dict(params: Any) -> dict[str, np.ndarray]:
  """A PyTorch-layout state dict (NumPy arrays) for a transformers Flax model's params.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.hf import to_torch_state_dict
    >>> sd = to_torch_state_dict({"model": {"q_proj": {"kernel": jnp.zeros((4, 8))}}})
    >>> list(sd.items())[0][0], list(sd.items())[0][1].shape
    ('model.q_proj.weight', (8, 4))
  """
  out: dict[str, np.ndarray] = {}
  for path, leaf in leaves_with_paths(params, is_leaf=is_lora_weight):
    if is_lora_weight(leaf):
      raise ValueError(f"{path!r} holds an adapter: export jlora.merge(params) (or jlora.unload) instead")
    parts = path.split("/")
    if parts[-1] not in _RENAME:
      raise ValueError(f"{path!r}: no PyTorch name for a parameter called {parts[-1]!r}")
    arr = np.asarray(jax.device_get(leaf))
    if parts[-1] == "kernel":
      if arr.ndim != 2:
        raise ValueError(f"{path!r}: only 2-D kernels map onto PyTorch Linear/Conv1D weights")
      arr = arr.T
    if arr.dtype.name == "bfloat16":
      arr = arr.astype(np.float32)  # safetensors.numpy has no bfloat16; transformers casts on load
    out[".".join(parts[:-1] + [_RENAME[parts[-1]]])] = np.ascontiguousarray(arr)
  return out


def save_pretrained_torch(directory: str, params: Any, config: Any, tokenizer: Any = None) -> str:
  """Writes ``config.json`` + ``model.safetensors`` (+ tokenizer) that PyTorch transformers loads.

  Args:
    directory: output directory (created).
    params: plain (e.g. merged) Flax parameters of a transformers Flax model.
    config: the model's ``transformers.PretrainedConfig``.
    tokenizer: optional tokenizer to save alongside.
  """
  from safetensors.numpy import save_file

  os.makedirs(directory, exist_ok=True)
  save_file(to_torch_state_dict(params), os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
  config.save_pretrained(directory)
  if tokenizer is not None:
    tokenizer.save_pretrained(directory)
  return directory
