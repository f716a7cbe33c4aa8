"""Loading a Hugging Face causal LM (Flax classes of transformers 4.x) and its tokenizer."""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jlora


@dataclasses.dataclass
class LoadedModel:
  model: Any  # transformers Flax model, loaded with _do_init=False (weights live in .params below)
  params: Any  # base parameters (the frozen W0 live here)
  tokenizer: Any
  model_id: str  # what the user passed, or the bundled default's name
  forward: Callable  # (params, ids, attention_mask) -> logits


def _quiet_transformers():
  warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")
  try:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
  except Exception:  # pragma: no cover
    pass


def load(model_dir: str, *, bf16: bool = False, model_id: str | None = None) -> LoadedModel:
  """Loads a causal LM directory: Flax weights, or PyTorch safetensors converted on load.

  Raises:
    FileNotFoundError: the directory or its weights are missing.
  """
  _quiet_transformers()
  import transformers

  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"--model {model_dir!r} is not a directory (offline: a local Hugging Face "
                            "model directory with config.json and weights is needed)")
  files = set(os.listdir(model_dir))
  if "flax_model.msgpack" in files or any(f.startswith("flax_model") for f in files):
    from_pt = False
  elif {"model.safetensors", "pytorch_model.bin"} & files or any(
      f.startswith("model-") and f.endswith(".safetensors") for f in files):
    from_pt = True
  else:
    raise FileNotFoundError(f"{model_dir!r} holds no flax_model.msgpack, model.safetensors or "
                            "pytorch_model.bin")
  # _do_init=False: the model object does not keep its own copy of the weights.
  kwargs = {"dtype": jnp.bfloat16} if bf16 else {}
  if from_pt:  # the PyTorch -> Flax conversion needs an initialised model; keep only its weights
    converted = transformers.FlaxAutoModelForCausalLM.from_pretrained(model_dir, from_pt=True, **kwargs)
    params = converted.params
    model = type(converted)(converted.config, _do_init=False, **kwargs)
    del converted
  else:
    model, params = transformers.FlaxAutoModelForCausalLM.from_pretrained(
        model_dir, _do_init=False, **kwargs)
  if bf16:
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                          params)
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token

  def forward(p, ids, attention_mask):
    return model(ids, attention_mask=attention_mask, params=p).logits

  return LoadedModel(model, params, tokenizer, model_id or model_dir, forward)


def resolve_targets(targets: str, layout: dict[str, jlora.KernelLayout]) -> str:
  """Turns the --targets option into a regex over parameter paths.

  ``all-linear`` means every matmul kernel except the output projection
  (``lm_head``) and embeddings, like PEFT; a comma-separated list of module
  names means those modules (``q_proj,v_proj``); anything else is a regex.
  """
  if targets == "all-linear":
    paths = [p for p, lay in layout.items()
             if not lay.embedding and "lm_head" not in p.split("/") and p.endswith("/kernel")]
    if not paths:
      raise ValueError("--targets all-linear found no linear kernels in this model")
    return "|".join(re.escape(p) for p in paths)
  if re.fullmatch(r"[A-Za-z0-9_]+(,[A-Za-z0-9_]+)*", targets):
    names = targets.split(",")
    return rf".*/({'|'.join(names)})/kernel"
  return targets


def example_inputs(tokenizer, seq_len: int = 8):
  ids = jnp.zeros((1, seq_len), jnp.int32)
  return ids, jnp.ones_like(ids)


def base_bytes(params) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


def save_pretrained(loaded: LoadedModel, directory: str, params) -> str:
  """Writes ``params`` as a Hugging Face model directory (Flax weights, config, tokenizer).

  ``config.dtype`` is set from the weights: transformers 4.57 otherwise records a
  Flax compute dtype as the unloadable string ``"numpy"``.
  """
  leaves = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
  loaded.model.config.dtype = np.dtype(leaves[0].dtype).name if leaves else "float32"
  loaded.model.save_pretrained(directory, params=params)
  loaded.tokenizer.save_pretrained(directory)
  return directory
