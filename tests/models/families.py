"""Tiny random PyTorch checkpoints of every supported family (the references of the tests)."""

from __future__ import annotations

import os

import numpy as np

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (transformers config class, extra config kwargs, torch attn_implementation)
FAMILIES = {
    # Llama 3.1: theta 500k + llama3 scaling with a short original context (so scaling is active
    # within the test lengths), tied embeddings (Llama 3.2 style).
    "llama3": ("LlamaConfig", dict(rope_theta=500000.0, tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}), "sdpa"),
    "llama2": ("LlamaConfig", dict(num_key_value_heads=4), "sdpa"),
    "mistral": ("MistralConfig", dict(sliding_window=5), "sdpa"),
    "qwen2": ("Qwen2Config", dict(), "sdpa"),
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True), "sdpa"),
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
                                    attn_logit_softcapping=3.0, final_logit_softcapping=2.5), "eager"),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                        rope_scaling={"rope_type": "linear", "factor": 8.0}), "eager"),
}


def torch_model(name: str, seed: int = 0):
  """A transformers PyTorch model of family ``name`` with O(1) random weights, in eval mode."""
  import torch
  import transformers

  cls_name, extra, impl = FAMILIES[name]
  cfg = getattr(transformers, cls_name)(**{**COMMON, **extra})
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
  gemma = name.startswith("gemma")
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if p.ndim >= 2:
        p.normal_(0.0, 1.0 if "embed_tokens" in pname else 1.5 / np.sqrt(p.shape[-1]))
      elif "norm" in pname:
        p.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.2)
  return model.eval()


def save_torch(model, directory) -> str:
  model.save_pretrained(str(directory), safe_serialization=True)
  assert os.path.exists(os.path.join(str(directory), "model.safetensors"))
  return str(directory)


# Two rows of 12 tokens (ids 3..95: no bos/eos/pad).
IDS = np.random.default_rng(0).integers(3, COMMON["vocab_size"], (2, 12))


def lora_init(f, config, *, seed: int = 0, scale: float | None = None):
  """``jlora.init`` (and optionally random non-zero factors) compiled as one program.

  Eagerly, every differently shaped factor compiles its own random-number
  kernel; one jitted call with XLA's RngBitGenerator keys keeps the tests fast.
  """
  import jax

  import jlora
  from helpers import randomize

  def make(params):
    lp = jlora.init(jax.random.key(seed, impl="rbg"), params, config, layout=f.model.layout)
    return lp if scale is None else randomize(lp, jax.random.key(seed + 1, impl="rbg"), scale=scale)

  return jax.jit(make)(f.params)
