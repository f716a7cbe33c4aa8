"""Fallback for architectures ``jlora.models`` does not implement (GPT-2, GPT-J, OPT, ...):
transformers 4.x's Flax model classes, run through ``jlora.wrap``.

Only transformers 4.x has these classes (5.x removed them). They have no
segment ids (packed examples attend to each other), no per-layer remat (the
whole loss is checkpointed instead) and they ignore RoPE scaling, which is why
the supported families never come here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jlora
import jlora.models
from jlora import hf as hf_lib
from jlora.finetune.loaded import (LoadedModel, MissingWeightsError, UnsupportedModelError, _quiet_transformers,
                                   model_type_of)
from jlora.peft import ModuleMap


def _round_up(n: int, m: int) -> int:
  return ((n + m - 1) // m) * m


@functools.lru_cache(maxsize=None)
def _generate_fn(model, lora: bool, max_new_tokens: int, temperature: float):
  """A jitted prefill + decode loop for one transformers Flax causal LM."""

  def call(params, ids, mask, pos, cache):
    out = model(ids, attention_mask=mask, position_ids=pos, params=params, past_key_values=cache)
    return out.logits, out.past_key_values

  step_fn = jlora.wrap(call) if lora else call

  def pick(logits, key):
    if temperature <= 0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

  @jax.jit
  def generate(params, ids, prompt_mask, cache, key, eos_id):
    b, p = ids.shape
    ext_mask = jnp.ones((b, p + max_new_tokens), jnp.int32)
    ext_mask = jax.lax.dynamic_update_slice(ext_mask, prompt_mask.astype(jnp.int32), (0, 0))
    pos = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
    logits, cache = step_fn(params, ids, ext_mask, pos, cache)
    keys = jax.random.split(key, max_new_tokens)
    tok = pick(logits[:, -1].astype(jnp.float32), keys[0])
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(tok)
    done = tok == eos_id
    last = pos[:, -1]

    def body(i, carry):
      out, tok, cache, last, done = carry
      last = last + 1
      logits, cache = step_fn(params, tok[:, None], ext_mask, last[:, None], cache)
      nxt = pick(logits[:, -1].astype(jnp.float32), keys[i])
      nxt = jnp.where(done, eos_id, nxt)
      return out.at[:, i].set(nxt), nxt, cache, last, done | (nxt == eos_id)

    out, *_ = jax.lax.fori_loop(1, max_new_tokens, body, (out, tok, cache, last, done))
    return out

  return generate


def generate_ids(model, params, prompts: Sequence[Sequence[int]], *, eos_id: int, pad_id: int,
                 max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
                 batch_size: int = 64) -> list[list[int]]:
  """Continues each prompt (left-padded batches) until EOS or ``max_new_tokens``."""
  lora = any(isinstance(x, jlora.LoraWeight)
             for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, jlora.LoraWeight)))
  fn = _generate_fn(model, lora, int(max_new_tokens), float(temperature))
  results: list[list[int]] = []
  key = jax.random.key(seed)
  for start in range(0, len(prompts), batch_size):
    chunk = [list(p) for p in prompts[start:start + batch_size]]
    n = len(chunk)
    b = _round_up(n, 8)
    p = _round_up(max(len(c) for c in chunk), 8)
    ids = np.full((b, p), pad_id, np.int32)
    mask = np.zeros((b, p), np.int32)
    for i, c in enumerate(chunk):
      ids[i, p - len(c):] = c
      mask[i, p - len(c):] = 1
    mask[n:, -1] = 1  # filler rows: one visible token
    cache = model.init_cache(b, p + max_new_tokens)
    key, sub = jax.random.split(key)
    out = np.asarray(fn(params, jnp.asarray(ids), jnp.asarray(mask), cache, sub, eos_id))
    for row in out[:n]:
      row = list(row)
      results.append(row[: row.index(eos_id)] if eos_id in row else row)
  return results


def load(model_dir: str, *, bf16: bool, remat: bool, tokenizer: Any, model_id: str):
  """A ``LoadedModel`` running transformers' Flax class for ``model_dir`` (Flax or PyTorch weights)."""
  _quiet_transformers()
  model_type = model_type_of(model_dir)
  try:
    import transformers

    auto = transformers.FlaxAutoModelForCausalLM
  except (ImportError, AttributeError):
    auto = None
  if auto is None:
    import transformers

    raise UnsupportedModelError(
        f"--model {model_dir!r}: model_type {model_type!r} is not one of jlora.models' native families "
        f"({', '.join(jlora.models.SUPPORTED_MODEL_TYPES)}), and transformers {transformers.__version__} has no "
        "Flax classes to fall back on (they exist in transformers 4.x only).")
  files = set(os.listdir(model_dir))
  if any(f.startswith("flax_model") for f in files):
    from_pt = False
  elif {"model.safetensors", "pytorch_model.bin"} & files or any(
      f.startswith("model-") and f.endswith(".safetensors") for f in files):
    from_pt = True
  else:
    raise FileNotFoundError(f"{model_dir!r} holds no flax_model.msgpack, model.safetensors or pytorch_model.bin")
  kwargs = {"dtype": jnp.bfloat16} if bf16 else {}
  try:
    with _newly_initialised() as fresh:
      model, params = _from_pretrained(auto, model_dir, from_pt, kwargs)
  except ValueError as e:
    if "Unrecognized configuration class" not in str(e):
      raise
    raise UnsupportedModelError(f"--model {model_dir!r}: model_type {model_type!r} is supported neither natively "
                     f"({', '.join(jlora.models.SUPPORTED_MODEL_TYPES)}) nor by a transformers Flax class.") from None
  if fresh:  # transformers initialised these at random (and would only have warned)
    raise MissingWeightsError(
        f"--model {model_dir!r}: the checkpoint lacks {', '.join(fresh[:5])}"
        + (f" and {len(fresh) - 5} more" if len(fresh) > 5 else "")
        + f"; transformers would initialise them at random. Give a complete {model_type} checkpoint.")
  if bf16:
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  return _finish(model, params, tokenizer, model_id, model_type)


@contextlib.contextmanager
def _newly_initialised():
  """Collects the parameters transformers reports as "newly initialized" while loading."""
  from transformers.utils import logging as hf_logging

  found: list[str] = []

  class Catch(logging.Handler):
    def emit(self, record):
      msg = record.getMessage()
      if "newly initialized" in msg:  # "... newly initialized: {('transformer', 'h', '0', ...), ...}"
        for names in re.findall(r"\(([^()]*)\)", msg.split("newly initialized", 1)[1]):
          found.append("/".join(x.strip(" '\"") for x in names.split(",")))

  level = hf_logging.get_verbosity()
  handler = Catch(logging.WARNING)
  root = logging.getLogger("transformers")
  root.addHandler(handler)
  hf_logging.disable_default_handler()  # caught here, not printed
  hf_logging.set_verbosity_warning()
  try:
    yield found
  finally:
    root.removeHandler(handler)
    hf_logging.set_verbosity(level)
    hf_logging.enable_default_handler()


def _from_pretrained(auto, model_dir, from_pt, kwargs):
  if from_pt:  # the PyTorch -> Flax conversion needs an initialised model; keep only its weights
    converted = auto.from_pretrained(model_dir, from_pt=True, **kwargs)
    model = type(converted)(converted.config, _do_init=False, **kwargs)
    return model, converted.params
  return auto.from_pretrained(model_dir, _do_init=False, **kwargs)


def _finish(model, params, tokenizer, model_id: str, model_type: str):
  """The ``LoadedModel`` of a transformers Flax model and its parameters."""
  def forward(p, ids, attention_mask, segment_ids=None):
    del segment_ids  # transformers' Flax models cannot separate packed examples
    return model(ids, attention_mask=attention_mask, params=p).logits

  ids = jnp.zeros((1, 8), jnp.int32)
  layout = jlora.infer_layout(forward, params, ids, jnp.ones_like(ids))

  def generate(params, prompts, **kw):
    return generate_ids(model, params, prompts, **kw)

  def save(directory: str, params) -> None:
    # transformers 4.57 otherwise records a Flax compute dtype as the unloadable string "numpy".
    leaves = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    model.config.dtype = np.dtype(leaves[0].dtype).name if leaves else "float32"
    model.save_pretrained(directory, params=params)  # Flax weights
    hf_lib.save_pretrained_torch(directory, params, model.config)  # + PyTorch safetensors

  config = model.config
  max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
  return LoadedModel(model=model, params=params, tokenizer=tokenizer, model_id=model_id, forward=forward,
                     layout=layout, module_map=ModuleMap.for_model_type(model_type), model_type=model_type,
                     max_positions=max_positions, native=False, _generate=generate, _save=save)
