"""--model DIR: Hugging Face checkpoints saved locally (GPT-2 via transformers' Flax class, Llama natively;
Flax and PyTorch weights)."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.finetune import TrainConfig, run
from jlora.finetune import model as model_lib
from jlora.finetune.config import DEFAULT_MODEL
from jlora.generate import generate_text

transformers = pytest.importorskip("transformers")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_dir(tmp_path, arch: str, fmt: str) -> str:
  d = tmp_path / f"{arch}-{fmt}"
  d.mkdir()
  if arch == "gpt2":
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=1024, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
  else:
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                                   max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
  if fmt == "flax":
    cls = transformers.FlaxGPT2LMHeadModel if arch == "gpt2" else transformers.FlaxLlamaForCausalLM
    cls(cfg, seed=0).save_pretrained(str(d))
  else:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cls = transformers.GPT2LMHeadModel if arch == "gpt2" else transformers.LlamaForCausalLM
    cls(cfg).save_pretrained(str(d), safe_serialization=True)
    assert os.path.exists(d / "model.safetensors")
  for f in TOKENIZER_FILES:
    shutil.copy(os.path.join(DEFAULT_MODEL, f), d / f)
  return str(d)


# The transformers-Flax fallback end to end (slow: the fallback's loading is checked by
# test_a_checkpoint_missing_a_weight_is_refused, its apply path by tests/test_hf_models.py).
@pytest.mark.parametrize("arch,fmt", [pytest.param("gpt2", "flax", marks=pytest.mark.slow),
                                      pytest.param("llama", "flax", marks=pytest.mark.slow),
                                      pytest.param("gpt2", "pt", marks=pytest.mark.slow),
                                      pytest.param("llama", "pt", marks=pytest.mark.slow)])
def test_finetune_on_local_hf_checkpoint(tmp_path, arch, fmt):
  model_dir = make_dir(tmp_path, arch, fmt)
  out = tmp_path / "out"
  cfg = TrainConfig(model=model_dir, output_dir=str(out), steps=4, batch_size=4, max_seq_len=32,
                    eval_exact_match=8, max_new_tokens=4, log_every=2, save_every=2, progress=False,
                    save_merged=True, targets="all-linear", reproducible=False)
  summary = run(cfg)
  assert summary["steps"] == 4 and 0.0 <= summary["after"]["exact_match"] <= 1.0
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
  meta = jlora.read_adapter_metadata(str(out / "adapter"))
  assert not any("lm_head" in p or "embed" in p or "wte" in p for p in meta["adapters"])
  if arch == "gpt2":  # transformers' Flax class (fallback); Conv1D kernels found stored (out, in)
    assert len(meta["adapters"]) == 2 * 4  # c_attn, c_proj, c_fc, c_proj in each of 2 layers
    assert all(a["layout"]["in_axes"] == [1] for a in meta["adapters"].values())
  else:  # jlora.models (also from flax_model.msgpack): one stacked adapter per projection kind
    assert sorted(p.split("/")[2] for p in meta["adapters"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert all(a["layout"]["batch_axes"] == [0] and a["shape"][0] == 2 for a in meta["adapters"].values())

  # The merged export loads with transformers and reproduces base + adapter.
  loaded = model_lib.load(model_dir)
  lp = jlora.load_adapter(str(out / "adapter"), loaded.params)
  ids = jnp.array([[1, 2, 3, 4, 5, 6]], jnp.int32)
  mask = jnp.ones_like(ids)
  merged_model = model_lib.load(str(out / "merged"))
  want = jlora.wrap(loaded.forward)(lp, ids, mask)
  got = merged_model.forward(merged_model.params, ids, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  with open(out / "merged" / "config.json") as f:
    assert json.load(f)["dtype"] == "float32"

  # Generation from base, unmerged and merged on one loaded base.
  texts = [generate_text(loaded, p, ["Reverse the words: a b c"], max_new_tokens=3)
           for p in (loaded.params, lp, jlora.merge(lp))]
  assert texts[1] == texts[2]


def test_a_checkpoint_missing_a_weight_is_refused(tmp_path):
  """transformers would initialise a missing weight at random and only warn: the command refuses."""
  import torch  # noqa: F401
  import transformers
  from safetensors.torch import load_file, save_file

  from jlora.finetune.options import ModelOptions, group
  from jlora.finetune.setup import load_model
  from jlora.finetune.cli import UserError

  d = tmp_path / "gpt2"
  cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=97, n_positions=16)
  transformers.GPT2LMHeadModel(cfg).save_pretrained(str(d), safe_serialization=True)
  sd = load_file(str(d / "model.safetensors"))
  sd.pop("transformer.h.0.mlp.c_fc.weight")
  save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
  for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(os.path.join(DEFAULT_MODEL, f), str(d / f))
  with pytest.raises(UserError, match=r"lacks transformer/h/0/mlp/c_fc/kernel; transformers would initialise"):
    load_model(group(TrainConfig(model=str(d), output_dir=str(tmp_path / "out")), ModelOptions))


def test_the_bundled_tokenizer_and_a_merged_directory_feed_transformers_generate(tmp_path):
  """``generate(**tok(text, return_tensors="pt"))`` on the merged directory: the bundled tokenizer
  returns no token_type_ids (a causal LM reads none, and transformers' generate refuses them)."""
  import torch  # noqa: F401
  import transformers

  loaded = model_lib.load(DEFAULT_MODEL)
  merged = loaded.save_pretrained(str(tmp_path / "merged"), loaded.params)
  tok = transformers.AutoTokenizer.from_pretrained(merged)
  enc = tok("Reverse the words: a b c\nAnswer:", return_tensors="pt")
  assert sorted(enc) == ["attention_mask", "input_ids"]
  model = transformers.AutoModelForCausalLM.from_pretrained(merged)
  out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
  assert out.shape[0] == 1 and enc["input_ids"].shape[1] < out.shape[1] <= enc["input_ids"].shape[1] + 3
