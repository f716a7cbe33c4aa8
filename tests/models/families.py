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


# Mixture-of-experts families (tests/models/test_moe.py): tiny, free of top-k ties on IDS (the test checks
# the margins), each exercising its family's particulars.
MOE_FAMILIES = {
    # top-2 of 8, renormalised; sliding window on every layer.
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=5), "sdpa"),
    # Shared expert with its sigmoid gate; norm_topk_prob False; decoder_sparse_step 2: layers 0 and 2 have the
    # dense MLP (intermediate_size), 1 and 3 the experts (one scanned group of period 2).
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_hidden_layers=4, num_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                         decoder_sparse_step=2, norm_topk_prob=False), "sdpa"),
    # top-4 of 16, norm_topk_prob, q/k norm, head_dim != hidden / heads; mlp_only_layers [0]: a dense first layer
    # (two scanned groups).
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=24, head_dim=16,
                                         norm_topk_prob=True, mlp_only_layers=[0]), "sdpa"),
    # Router bias, fused interleaved gate_up with biases and the clamped SwiGLU (weights large enough to clamp),
    # attention sinks, sliding/full layers, YaRN with truncate False (active at these positions). hidden and
    # intermediate are multiples of 32 (MXFP4 blocks); hidden 64: two blocks per row.
    "gpt_oss": ("GptOssConfig", dict(hidden_size=64, intermediate_size=32, head_dim=16, num_local_experts=8,
                                     num_experts_per_tok=2, sliding_window=5, max_position_embeddings=256,
                                     rope_scaling={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0,
                                                   "beta_slow": 1.0, "truncate": False,
                                                   "original_max_position_embeddings": 32}), "eager"),
}
# Seeds whose routers have clear top-k margins on IDS (test_moe checks them).
MOE_SEEDS = {"mixtral": 1, "qwen2_moe": 0, "qwen3_moe": 3, "gpt_oss": 0}


def torch_model(name: str, seed: int | None = None):
  """A transformers PyTorch model of family ``name`` with O(1) random weights, in eval mode."""
  import torch
  import transformers

  moe = name in MOE_FAMILIES
  cls_name, extra, impl = (MOE_FAMILIES if moe else FAMILIES)[name]
  cfg = getattr(transformers, cls_name)(**{**COMMON, **extra})
  torch.manual_seed(MOE_SEEDS.get(name, 0) if seed is None else seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
  gemma = name.startswith("gemma")
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if moe and pname.endswith(("experts.gate_up_proj", "experts.down_proj")):  # gpt-oss (E, in, out)
        p.normal_(0.0, (3.0 if "gate_up" in pname else 1.5) / np.sqrt(p.shape[-2]))
      elif p.ndim >= 2:
        p.normal_(0.0, 1.0 if "embed_tokens" in pname else 1.5 / np.sqrt(p.shape[-1]))
      elif "norm" in pname:
        p.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn_like(p))
      elif pname.endswith("sinks"):
        p.normal_(0.0, 1.0)
      else:
        p.normal_(0.0, 0.2)
  return model.eval()


def save_torch(model, directory) -> str:
  model.save_pretrained(str(directory), safe_serialization=True)
  assert os.path.exists(os.path.join(str(directory), "model.safetensors"))
  return str(directory)


# Two prompts of different lengths, for greedy generation against transformers'.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]


def torch_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
  """transformers' greedy continuation of each prompt (left-padded with id 0, no EOS stop)."""
  import torch  # (the reference, imported where it is used)

  width = max(len(p) for p in prompts)
  ids = np.zeros((len(prompts), width), np.int64)
  mask = np.zeros((len(prompts), width), np.int64)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):] = p
    mask[i, width - len(p):] = 1
  with torch.no_grad():
    out = model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
  return out[:, width:].numpy().tolist()


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
