"""LoRA on Hugging Face Flax models (transformers 4.57.x, tiny random configs, no download)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from helpers import assert_close, oracle_params, randomize

transformers = pytest.importorskip("transformers")


def gpt2():
  cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=16)
  return transformers.FlaxGPT2LMHeadModel(cfg, seed=0)


def llama():
  cfg = transformers.LlamaConfig(
      num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
      num_key_value_heads=2, vocab_size=97, max_position_embeddings=16)
  return transformers.FlaxLlamaForCausalLM(cfg, seed=0)


def mistral():
  cfg = transformers.MistralConfig(
      num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
      num_key_value_heads=2, vocab_size=97, max_position_embeddings=16, sliding_window=8)
  return transformers.FlaxMistralForCausalLM(cfg, seed=0)


def gemma():
  cfg = transformers.GemmaConfig(
      num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
      num_key_value_heads=2, head_dim=8, vocab_size=97, max_position_embeddings=16)
  return transformers.FlaxGemmaForCausalLM(cfg, seed=0)


IDS = jnp.array([[5, 7, 11, 13, 2, 3], [1, 2, 3, 4, 5, 6]], jnp.int32)


def _apply_fn(model):
  return lambda p, ids: model(ids, params=p).logits


@pytest.mark.parametrize(
    "make,targets,expected",
    [
        pytest.param(gpt2, r".*/c_attn/kernel", 2, marks=pytest.mark.slow),  # a subset of the next case
        (gpt2, r".*/(c_attn|c_proj|c_fc)/kernel", 8),
        (llama, r".*/(q_proj|v_proj)/kernel", 4),
        (llama, r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel", 14),
        (mistral, r".*/(q_proj|v_proj|down_proj)/kernel", 6),
        (gemma, r".*/(q_proj|o_proj|up_proj)/kernel|.*/embed_tokens/embedding", 7),
    ],
)
def test_peft_style_targets_match_dense_oracle(make, targets, expected):
  model = make()
  f = _apply_fn(model)
  layout = jlora.infer_layout(f, model.params, IDS)
  lp = jlora.init(jax.random.key(0), model.params, jlora.LoraConfig(rank=4, alpha=8, targets=targets),
                  layout=layout)
  assert jlora.count(lp).num_adapters == expected
  wrapped = jax.jit(jlora.wrap(f))
  # B = 0: op by op the wrapped model computes exactly the base model's values.
  np.testing.assert_array_equal(np.asarray(jlora.wrap(f)(lp, IDS)), np.asarray(f(model.params, IDS)))
  # Under jit XLA may fuse the extra (zero) add into a following reduction (GPT-2's
  # residual + layer norm) and reorder it: allow a few float32 ulps of the logits.
  base = jax.jit(f)(model.params, IDS)
  assert_close(wrapped(lp, IDS), base, rtol=0, atol=4 * float(np.spacing(np.abs(np.asarray(base)).max())))
  lp = randomize(lp, jax.random.key(1), scale=0.3)
  got = wrapped(lp, IDS)
  assert not np.allclose(np.asarray(got), np.asarray(base), atol=1e-3)
  assert_close(got, jax.jit(f)(oracle_params(lp), IDS), rtol=1e-4, atol=1e-4)
  merged = jlora.merge(lp)
  assert jax.tree.structure(merged) == jax.tree.structure(model.params)
  assert_close(jax.jit(f)(merged, IDS), got, rtol=1e-4, atol=1e-4)


def test_gpt2_layout_is_conv1d_transposed_and_embeddings_detected():
  model = gpt2()
  layout = jlora.infer_layout(_apply_fn(model), model.params, IDS)
  assert layout["transformer/h/0/attn/c_attn/kernel"] == jlora.KernelLayout(in_axes=(1,))
  assert layout["transformer/h/1/mlp/c_proj/kernel"] == jlora.KernelLayout(in_axes=(1,))
  assert layout["transformer/wte/embedding"] == jlora.KernelLayout(in_axes=(0,), embedding=True)


def test_gpt2_tied_embedding_lora():
  model = gpt2()
  f = _apply_fn(model)
  lp = jlora.init(jax.random.key(0), model.params,
                  jlora.LoraConfig(rank=4, targets=r".*/wte/embedding"))
  lp = randomize(lp, jax.random.key(1), scale=0.3)
  assert_close(jax.jit(jlora.wrap(f))(lp, IDS), jax.jit(f)(oracle_params(lp), IDS), rtol=1e-4, atol=1e-4)


def test_llama_default_layout_without_probe():
  model = llama()
  lp = jlora.init(jax.random.key(0), model.params, jlora.LoraConfig(rank=4, targets=r".*/q_proj/kernel"))
  w = lp["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
  assert w.a.shape == (32, 4) and w.b.shape == (4, 32)
