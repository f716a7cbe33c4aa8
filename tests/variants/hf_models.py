"""Tiny PyTorch transformers models and their JAX twins (jlora.finetune.model.load: jlora.models for Llama), shared by the
variants' PEFT-parity tests."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora

IDS = [[5, 7, 11, 13, 2, 3, 9, 1], [1, 2, 3, 4, 5, 6, 7, 8]]
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def torch_model(arch):
  import torch
  import transformers

  torch.manual_seed(0)
  if arch == "gpt2":
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).eval()
  cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=97, max_position_embeddings=16)
  return transformers.LlamaForCausalLM(cfg).eval()


def make_base(arch, directory, native=True):
  """Saves the tiny torch model; loads it natively (jlora.models: stacked layers) or, with
  ``native=False``, with transformers' Flax class (one kernel per layer, as PEFT names them)."""
  from jlora.finetune import hf_flax
  from jlora.finetune import model as model_lib
  from jlora.finetune.config import DEFAULT_MODEL

  torch_model(arch).save_pretrained(str(directory), safe_serialization=True)
  for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(os.path.join(DEFAULT_MODEL, f), os.path.join(str(directory), f))
  if native:
    return model_lib.load(str(directory))
  return hf_flax.load(str(directory), bf16=False, remat=False, tokenizer=model_lib.load_tokenizer(str(directory)),
                      model_id=str(directory))


def torch_logits(model, ids=IDS):
  import torch

  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def flax_logits(loaded, params, ids=IDS):
  ids = jnp.asarray(ids, jnp.int32)
  return np.asarray(jlora.wrap(loaded.forward)(params, ids, jnp.ones_like(ids)))


def layout(loaded):
  if loaded.native:  # jlora.models: the decoder's own (stacked) layout
    return loaded.layout
  ids = jnp.zeros((1, 4), jnp.int32)
  return jlora.infer_layout(loaded.forward, loaded.params, ids, jnp.ones_like(ids))


def targets_regex(arch):
  return rf".*/({'|'.join(TARGETS[arch])})/kernel"


def lm_loss(loaded, params, ids=IDS):
  ids = jnp.asarray(ids, jnp.int32)
  logits = jlora.wrap(loaded.forward)(params, ids, jnp.ones_like(ids))
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def train_jlora(loaded, lp, steps=3, lr=1e-2):
  adapters, frozen = jlora.split(lp)
  tx = jlora.optimizer(optax.adam(lr), adapters)
  state = tx.init(adapters)
  grad = jax.jit(jax.grad(lambda a: lm_loss(loaded, jlora.combine(a, frozen))))
  for _ in range(steps):
    u, state = tx.update(grad(adapters), state, adapters)
    adapters = optax.apply_updates(adapters, u)
  return jlora.combine(adapters, frozen)


def train_torch(model, steps=3, lr=1e-2):
  import torch

  model.train()
  opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
  ids = torch.tensor(IDS)
  for _ in range(steps):
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
  return model.eval()


@functools.lru_cache(maxsize=None)
def hf_base(arch, native=True):
  """The tiny base of ``arch`` saved once per process, its JAX twin and kernel layout."""
  loaded = make_base(arch, tempfile.mkdtemp(prefix=f"jlora-{arch}-"), native)
  return loaded, layout(loaded)
