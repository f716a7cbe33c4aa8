"""Tiny Llama config and preference records shared by the objectives tests (token ids, no tokenizer)."""

from __future__ import annotations

import numpy as np

VOCAB = 128
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
             rms_norm_eps=1e-6)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PAD = 0


def torch_llama(seed: int = 0):
  """The PyTorch reference: a transformers Llama with O(1) random weights, float32, eval mode."""
  import torch
  import transformers

  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2:
        p.normal_(0.0, 1.0 if "embed_tokens" in name else 1.0 / np.sqrt(p.shape[-1]))
      else:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  return model.eval()


def pad_rows(rows: list[list[int]], value: int = PAD) -> np.ndarray:
  width = max(len(r) for r in rows)
  return np.array([r + [value] * (width - len(r)) for r in rows], np.int64)


def preference_records(seed: int = 0, pairs: int = 3):
  """``pairs`` (prompt, chosen, rejected) token-id lists, prompts starting with BOS, completions ending with EOS."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(pairs):
    prompt = [1] + rng.integers(3, VOCAB, rng.integers(2, 6)).tolist()
    chosen = rng.integers(3, VOCAB, rng.integers(2, 7)).tolist() + [2]
    rejected = rng.integers(3, VOCAB, rng.integers(2, 7)).tolist() + [2]
    out.append((prompt, chosen, rejected))
  return out


def preference_batch(records) -> dict[str, np.ndarray]:
  """TRL's ``DataCollatorForPreference`` arrays: ``[chosen; rejected]`` rows, right-padded."""
  seqs, comp = [], []
  for side in (1, 2):
    for r in records:
      seqs.append(r[0] + r[side])
      comp.append([0] * len(r[0]) + [1] * len(r[side]))
  ids = pad_rows(seqs)
  return {"input_ids": ids, "attention_mask": pad_rows([[1] * len(s) for s in seqs], 0),
          "completion_mask": pad_rows(comp, 0)}
