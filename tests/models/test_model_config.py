"""config.json parsing (transformers 4.x and 5.x layouts) and the checkpoint checks of ``load``."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jlora
import jlora.models
from jlora.models import ModelConfig, RopeConfig

transformers = pytest.importorskip("transformers")

SMALL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2}


def test_public_api_resolves():
  for name in jlora.models.__all__:
    assert getattr(jlora.models, name) is not None, name


def test_unsupported_model_type_names_it_and_lists_the_supported():
  with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported by jlora.models; supported: llama, "
                                       r"mistral, qwen2, qwen3, gemma, gemma2, gemma3_text"):
    ModelConfig.from_hf({"model_type": "gpt2"})
  with pytest.raises(ValueError, match="multimodal Gemma 3 checkpoint"):
    ModelConfig.from_hf({"model_type": "gemma3", "text_config": {}})
  with pytest.raises(ValueError, match=r"rope type 'dynamic' is not supported; supported: default, linear, llama3, yarn"):
    ModelConfig.from_hf({"model_type": "llama", **SMALL, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
  with pytest.raises(ValueError, match="rope_scaling of type 'llama3' needs low_freq_factor"):
    RopeConfig(rope_type="llama3", factor=8.0)
  with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"):
    ModelConfig.from_hf({"model_type": "llama", **SMALL, "num_key_value_heads": 3})
  with pytest.raises(ValueError, match="Decoder.remat must be one of"):
    jlora.models.Decoder(ModelConfig.from_hf({"model_type": "llama", **SMALL}), remat="some")


@pytest.mark.parametrize("cls,kw", [
    ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2)),
    ("Qwen3Config", dict(use_sliding_window=False, sliding_window=8, head_dim=16)),
    ("MistralConfig", dict(sliding_window=8)),
    ("MistralConfig", dict(sliding_window=None)),
    ("Gemma2Config", dict(head_dim=16)),
    ("Gemma3TextConfig", dict(head_dim=16, sliding_window_pattern=3)),
])
def test_layer_types_and_windows_follow_transformers(cls, kw):
  hf = getattr(transformers, cls)(**SMALL, **kw)
  cfg = ModelConfig.from_hf(hf.to_dict())
  want = getattr(hf, "layer_types", None) or ["sliding_attention" if hf.sliding_window else "full_attention"] * 4
  assert list(cfg.layer_types) == list(want)
  assert cfg.sliding_window == (hf.sliding_window if "sliding_attention" in want else None)
  assert cfg.head_dim == getattr(hf, "head_dim", None) or cfg.head_dim == 8


def test_transformers5_rope_parameters_layout():
  v4 = {"model_type": "llama", **SMALL, "rope_theta": 500000.0, "rope_scaling": {
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}}
  v5 = {"model_type": "llama", **SMALL, "rope_parameters": {**v4["rope_scaling"], "rope_theta": 500000.0}}
  assert ModelConfig.from_hf(v5) == ModelConfig.from_hf(v4)
  # Gemma 3 in transformers 5: one entry per layer type.
  g = {"model_type": "gemma3_text", **SMALL, "head_dim": 8, "rope_parameters": {
      "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
  cfg = ModelConfig.from_hf(g)
  assert cfg.rope == RopeConfig(rope_type="linear", factor=8.0, theta=1e6)
  assert cfg.rope_local == RopeConfig(theta=1e4)
  old = ModelConfig.from_hf({"model_type": "gemma3_text", **SMALL, "head_dim": 8, "rope_theta": 1e6,
                             "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
  assert old == cfg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  cfg = ModelConfig.from_hf({"model_type": "qwen2", **SMALL, "num_hidden_layers": 2, "tie_word_embeddings": True})
  model = jlora.models.Decoder(cfg)
  params = jax.jit(model.init)(jax.random.key(0, impl="rbg"))  # one quick compile for all shapes
  return model, params, jlora.models.save(str(tmp_path_factory.mktemp("qwen2")), model, params)


def _edit(src, dst, fn):
  shutil.copytree(src, dst)
  path = os.path.join(dst, "model.safetensors")
  tensors = load_file(path)
  fn(tensors)
  save_file(tensors, path, metadata={"format": "pt"})
  return str(dst)


def test_missing_unexpected_and_misshaped_weights_are_named(saved, tmp_path):
  _, _, d = saved
  missing = _edit(d, tmp_path / "m", lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
  with pytest.raises(jlora.models.CheckpointError,
                     match=r"1 weights are missing: model.layers.1.self_attn.k_proj.bias.*refusing to load"):
    jlora.models.load(missing)
  extra = _edit(d, tmp_path / "x", lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(jlora.models.CheckpointError, match=r"tensors are not weights of a qwen2 model.*mlp.extra.weight"):
    jlora.models.load(extra)
  shape = _edit(d, tmp_path / "s", lambda t: t.update({"model.norm.weight": np.zeros(31, np.float32)}))
  with pytest.raises(jlora.models.CheckpointError, match=r"model.norm.weight has shape \(31,\), expected \(32,\)"):
    jlora.models.load(shape)
  lm = _edit(d, tmp_path / "t", lambda t: t.update({"lm_head.weight": np.ones((64, 32), np.float32)}))
  with pytest.raises(jlora.models.CheckpointError, match="ties the embeddings .* different lm_head.weight"):
    jlora.models.load(lm)
  os.remove(os.path.join(shape, "model.safetensors"))
  open(os.path.join(shape, "pytorch_model.bin"), "wb").close()
  with pytest.raises(FileNotFoundError, match=r"no model.safetensors .*pytorch_model.bin.*convert them to safetensors"):
    jlora.models.load(shape)
  model, params, _ = saved
  lp = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets="layers/mlp/up_proj/kernel"),
                  layout=model.layout)
  with pytest.raises(ValueError, match="'layers/mlp/up_proj/kernel' holds an adapter: save jlora.merge"):
    jlora.models.save(str(tmp_path / "lora"), model, lp)


def test_sharded_checkpoint_round_trip(saved, tmp_path):
  model, params, _ = saved
  d = jlora.models.save(str(tmp_path / "sharded"), model, params, max_shard_bytes=20_000)
  files = sorted(os.listdir(d))
  assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) > 2
  m2, p2 = jlora.models.load(d)
  jax.tree.map(np.testing.assert_array_equal, p2, params)
  torch = pytest.importorskip("torch")
  tm = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
  ids = np.array([[1, 2, 3, 4]])
  with torch.no_grad():
    want = tm(torch.as_tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(params, jnp.asarray(ids))), want, rtol=1e-5, atol=1e-5)
  with open(os.path.join(d, "config.json")) as f:
    assert json.load(f)["architectures"] == ["Qwen2ForCausalLM"]


def test_generate_argument_errors(saved):
  model, params, _ = saved
  with pytest.raises(ValueError, match="needs key="):
    jlora.models.generate(model, params, [[1]], max_new_tokens=2, temperature=0.7)
  with pytest.raises(ValueError, match="at least one token"):
    jlora.models.generate(model, params, [[1], []], max_new_tokens=2)
  with pytest.raises(ValueError, match="padding must be 'left' or 'right'"):
    jlora.models.generate(model, params, [[1]], max_new_tokens=2, padding="middle")


def test_sampling_is_reproducible_and_top_p_restricts_to_the_nucleus():
  from jlora.models.generate import sample_token

  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.key(0)
  sample = jax.jit(sample_token, static_argnames=("temperature", "top_p"))
  draws = np.asarray(sample(logits, keys, temperature=1.0, top_p=0.75))
  assert set(draws.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75: tokens 2 and 3 are cut
  assert abs(np.mean(draws == 0) - 0.5 / 0.8) < 0.03  # renormalised within the nucleus (4000 draws: ~4 sd)
  full = np.asarray(sample(logits, keys, temperature=1.0, top_p=1.0))
  assert abs(np.mean(full == 3) - 0.05) < 0.015
  np.testing.assert_array_equal(full, np.asarray(sample(logits, keys, temperature=1.0, top_p=1.0)))
