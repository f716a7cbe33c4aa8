"""PEFT format against the real thing: PyTorch transformers + peft load what jlora writes, and back."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
import jlora.hf
import jlora.peft

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from jlora.finetune import hf_flax  # noqa: E402

# float32 on both sides; PyTorch and XLA order their sums differently, so logits of a
# 2-layer model with O(1) values agree to ~1e-6; 2e-5 leaves room without hiding a bug
# (a wrong scale, transpose or missing module moves logits by > 1e-2).
TOL = dict(rtol=2e-5, atol=2e-5)
IDS = [[5, 7, 11, 13, 2, 3, 9, 1], [1, 2, 3, 4, 5, 6, 7, 8]]

ARCHS = {
    "gpt2": dict(attn=["c_attn"], mlp=["c_fc"], emb="transformer.wte", all=["c_attn", "c_proj", "c_fc"]),
    "llama": dict(attn=["q_proj", "v_proj"], mlp=["up_proj", "down_proj"], emb="model.embed_tokens",
                  all=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}


def torch_model(arch):
  torch.manual_seed(0)
  if arch == "gpt2":
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).eval()
  cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=97, max_position_embeddings=16)
  return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request, tmp_path_factory):
  arch = request.param
  d = tmp_path_factory.mktemp(f"{arch}-base")
  tm = torch_model(arch)
  tm.save_pretrained(str(d), safe_serialization=True)
  transformers_tok_files(d)
  # transformers' Flax classes (GPT-2 and Llama) as library interop, PyTorch weights converted on load.
  loaded = hf_flax.load(str(d), bf16=False, remat=False, tokenizer=None, model_id=str(d))
  return arch, str(d), loaded


def transformers_tok_files(d):
  from jlora.finetune.config import DEFAULT_MODEL
  import shutil

  for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(os.path.join(DEFAULT_MODEL, f), d / f)


def torch_logits(model, ids=IDS):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def flax_logits(loaded, params, ids=IDS):
  ids = jnp.asarray(ids, jnp.int32)
  fwd = jlora.wrap(loaded.forward) if any(isinstance(x, jlora.LoraWeight) for x in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))) else loaded.forward
  return np.asarray(fwd(params, ids, jnp.ones_like(ids)))


def train_a_few_steps(loaded, lp, steps=3):
  adapters, frozen = jlora.split(lp)
  tx = jlora.optimizer(optax.adam(1e-2), adapters)
  state = tx.init(adapters)
  ids = jnp.asarray(IDS, jnp.int32)
  wrapped = jlora.wrap(loaded.forward)

  def loss(a):
    logits = wrapped(jlora.combine(a, frozen), ids, jnp.ones_like(ids))
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

  for _ in range(steps):
    g = jax.grad(loss)(adapters)
    u, state = tx.update(g, state, adapters)
    adapters = optax.apply_updates(adapters, u)
  return jlora.combine(adapters, frozen)


def jlora_config(arch, *, rslora=False, embedding=False, mlp_rslora=None):
  names = ARCHS[arch]
  rules = [jlora.Rule(pattern=rf".*/({'|'.join(names['mlp'])})/kernel", rank=6, alpha=3.0, rslora=mlp_rslora),
           rf".*/({'|'.join(names['attn'])})/kernel"]
  if embedding:  # GPT-2 ties wte to the output projection (refused on export): use wpe
    rules.append(r".*/(wpe|embed_tokens)/embedding")
  return jlora.LoraConfig(rank=4, alpha=8, rslora=rslora, targets=rules)


@pytest.mark.parametrize("rslora,embedding,mlp_rslora", [(False, False, None), (True, True, None),
                                                       (False, False, True)])
def test_export_loads_in_peft_with_matching_logits(setup, tmp_path, rslora, embedding, mlp_rslora):
  arch, base_dir, loaded = setup
  layout = jlora.infer_layout(loaded.forward, loaded.params, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
  lp = jlora.init(jax.random.key(0), loaded.params,
                  jlora_config(arch, rslora=rslora, embedding=embedding, mlp_rslora=mlp_rslora), layout=layout)
  lp = train_a_few_steps(loaded, lp)
  assert all(np.abs(np.asarray(w.b)).max() > 0 for w in jlora._checkpoint.adapter_weights(lp).values())
  out = jlora.peft.save(str(tmp_path / "peft"), lp, base_model_name_or_path=base_dir, model_type=arch)
  with open(os.path.join(out, "adapter_config.json")) as f:
    cfg = json.load(f)
  # Every module's rank is the default or its pattern entry (MLP: 6, attention: 4), and its scale (alpha
  # over r, or over sqrt(r) with use_rslora) is jlora's: 3/6 or 8/4, and 3/sqrt(6) for a Rule(rslora=True).
  mlp_scale = 3.0 / (math.sqrt(6) if (rslora if mlp_rslora is None else mlp_rslora) else 6)
  for m in cfg["target_modules"]:
    mlp = any(f".{n}" in m for n in ARCHS[arch]["mlp"])
    r, alpha = cfg["rank_pattern"].get(m, cfg["r"]), cfg["alpha_pattern"].get(m, cfg["lora_alpha"])
    assert r == (6 if mlp else 4)
    scale = alpha / (math.sqrt(r) if cfg["use_rslora"] else r)
    assert scale == pytest.approx(mlp_scale if mlp else 8.0 / (math.sqrt(4) if rslora else 4), rel=1e-12)
  if mlp_rslora is None:
    assert cfg["use_rslora"] is rslora
  assert cfg["fan_in_fan_out"] is (arch == "gpt2")
  allowed = {"peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "target_modules",
             "lora_dropout", "bias", "use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern",
             "alpha_pattern", "init_lora_weights", "modules_to_save", "inference_mode"}
  assert set(cfg) <= allowed
  # The base fingerprint rides in the safetensors header, where PEFT and vLLM ignore it.
  from safetensors import safe_open

  with safe_open(os.path.join(out, "adapter_model.safetensors"), "np") as f:
    assert f.metadata()[jlora.peft._format.FINGERPRINT_KEY] == jlora.fingerprint(loaded.params)

  pm = peft.PeftModel.from_pretrained(torch_model(arch), out).eval()  # loads the file with that header
  want = flax_logits(loaded, lp)
  np.testing.assert_allclose(torch_logits(pm), want, **TOL)
  base = torch_logits(torch_model(arch))
  assert np.abs(want - base).max() > 1e-3  # the adapter matters
  merged = pm.merge_and_unload()
  np.testing.assert_allclose(torch_logits(merged), want, **TOL)
  # jlora's merged model, saved for PyTorch, loads in transformers with the same logits.
  d = jlora.hf.save_pretrained_torch(str(tmp_path / "merged"), jlora.merge(lp), loaded.model.config)
  tm = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
  np.testing.assert_allclose(torch_logits(tm), want, **TOL)


def test_import_peft_adapter_with_patterns(setup, tmp_path):
  arch, base_dir, loaded = setup
  names = ARCHS[arch]
  tm = torch_model(arch)
  cfg = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=names["all"], fan_in_fan_out=arch == "gpt2",
                        rank_pattern={names["mlp"][0]: 2}, alpha_pattern={names["attn"][0]: 5})
  pm = peft.get_peft_model(tm, cfg)
  torch.manual_seed(1)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_" in n:
        p.normal_(0, 0.2)
  pm.eval()
  pm.save_pretrained(str(tmp_path / "peft"))
  assert jlora.peft.read_base_fingerprint(str(tmp_path / "peft")) is None  # PEFT records none
  with pytest.warns(jlora.peft.UnverifiedBaseWarning, match="records no base-model fingerprint") as warned:
    lp = jlora.peft.load(str(tmp_path / "peft"), loaded.params, model_type=arch)
    jlora.peft.load(str(tmp_path / "peft"), loaded.params, model_type=arch)
  assert len([w for w in warned if w.category is jlora.peft.UnverifiedBaseWarning]) == 1  # once per adapter
  ws = jlora._checkpoint.adapter_weights(lp)
  n_peft = sum(1 for n, _ in pm.named_modules() if n.endswith("lora_A"))
  assert len(ws) == n_peft == 2 * (len(names["all"]) + (arch == "gpt2"))  # GPT-2 has two c_proj per layer
  first = next(p for p in ws if f"/{names['mlp'][0]}/" in p)
  assert ws[first].spec.rank == 2
  attn = next(p for p in ws if f"/{names['attn'][0]}/" in p)
  assert ws[attn].spec.scale == pytest.approx(5 / 2.0)  # rsLoRA: alpha/sqrt(r)
  np.testing.assert_allclose(flax_logits(loaded, lp), torch_logits(pm), **TOL)


def test_round_trip_is_exact(setup, tmp_path):
  arch, _, loaded = setup
  layout = jlora.infer_layout(loaded.forward, loaded.params, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
  lp = jlora.init(jax.random.key(3), loaded.params, jlora_config(arch, embedding=True), layout=layout)
  lp = train_a_few_steps(loaded, lp, steps=1)
  d = jlora.peft.save(str(tmp_path / "rt"), lp, model_type=arch)
  back = jlora.peft.load(d, loaded.params, model_type=arch)
  a, b = jlora._checkpoint.adapter_weights(lp), jlora._checkpoint.adapter_weights(back)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].spec == b[k].spec
    np.testing.assert_array_equal(np.asarray(a[k].a), np.asarray(b[k].a))
    np.testing.assert_array_equal(np.asarray(a[k].b), np.asarray(b[k].b))


def _write(d, config, tensors=None):
  from safetensors.numpy import save_file

  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "adapter_config.json"), "w") as f:
    json.dump(config, f)
  if tensors is not None:
    save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
  return str(d)


def test_tied_embedding_adapter_is_refused_on_export(tmp_path):
  cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=97, n_positions=16)
  params = transformers.FlaxGPT2LMHeadModel(cfg, seed=0).params
  lp = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets=r".*/wte/embedding"))
  with pytest.raises(jlora.peft.PeftFormatError, match="tied to the output projection"):
    jlora.peft.save(str(tmp_path / "x"), lp, model_type="gpt2")


@pytest.mark.filterwarnings("ignore::jlora.peft.UnverifiedBaseWarning")  # hand-written adapters record no base
def test_refusals_name_the_problem(setup, tmp_path):
  arch, _, loaded = setup
  base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["x"]}
  module = "model.layers.0.self_attn.q_proj" if arch == "llama" else "transformer.h.0.attn.c_attn"
  k = f"base_model.model.{module}"
  cases = [
      ({**base, "peft_type": "IA3"}, None, r"peft_type 'IA3' is not supported"),
      ({**base, "use_dora": True}, {f"{k}.lora_A.weight": np.zeros((2, 32), np.float32),
                                    f"{k}.lora_B.weight": np.zeros((96 if arch == 'gpt2' else 32, 2), np.float32)},
       r"use_dora is set but module .* has no lora_magnitude_vector"),
      ({**base, "modules_to_save": ["lm_head"]}, None, r"modules_to_save"),
      ({**base, "bias": "all"}, None, r"bias='all'"),
      (base, {"base_model.model.nope.lora_A.weight": np.zeros((2, 32), np.float32),
              "base_model.model.nope.lora_B.weight": np.zeros((32, 2), np.float32)}, r"module 'nope' matches no Flax parameter"),
      (base, {f"{k}.lora_A.weight": np.zeros((2, 31), np.float32),
              f"{k}.lora_B.weight": np.zeros((96 if arch == 'gpt2' else 32, 2), np.float32)},
       rf"'{module}': A \(2, 31\) / B .* do not fit Flax parameter"),
      (base, {f"{k}.lora_A.weight": np.zeros((2, 32), np.float32)}, r"has only \['lora_A'\]; both A and B"),
      (base, {f"{k}.lora_A.weight": np.zeros((3, 32), np.float32),
              f"{k}.lora_B.weight": np.zeros((96 if arch == 'gpt2' else 32, 3), np.float32)}, r"has rank 3 but the config says 2"),
      (base, {f"{k}.weight": np.zeros((2, 2), np.float32)}, r"is not a LoRA A/B weight"),
  ]
  for i, (config, tensors, match) in enumerate(cases):
    d = _write(tmp_path / f"c{i}", config, tensors if tensors is not None else {})
    with pytest.raises(jlora.peft.PeftFormatError, match=match):
      jlora.peft.load(d, loaded.params, model_type=arch)
  d = _write(tmp_path / "bin", base)
  open(os.path.join(d, "adapter_model.bin"), "wb").close()
  os.remove(os.path.join(d, "adapter_model.safetensors")) if os.path.exists(os.path.join(d, "adapter_model.safetensors")) else None
  with pytest.raises(jlora.peft.PeftFormatError, match="safe_serialization=True"):
    jlora.peft.load(d, loaded.params, model_type=arch)


def test_wrong_base_is_refused_by_its_fingerprint(setup, tmp_path):
  arch, _, loaded = setup
  layout = jlora.infer_layout(loaded.forward, loaded.params, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
  lp = jlora.init(jax.random.key(0), loaded.params, jlora_config(arch), layout=layout)
  d = jlora.peft.save(str(tmp_path / "peft"), lp, base_model_name_or_path="my/base", model_type=arch)
  with open(os.path.join(d, "adapter_config.json")) as f:
    assert "fingerprint" not in f.read()  # older PEFT releases reject unknown config keys
  other = jax.tree.map(lambda x: x * 1.01, loaded.params)  # same shapes, other weights
  want, got = jlora.fingerprint(loaded.params), jlora.fingerprint(other)
  with pytest.raises(jlora.AdapterMismatchError,
                     match=rf"'my/base' \(weights fingerprint {want}\).* fingerprint {got}\..*check_base=False"):
    jlora.peft.load(d, other, model_type=arch)
  with pytest.raises(jlora.AdapterMismatchError, match="--no-check-base"):
    jlora.peft.verify_base(d, other, fix="Pass --no-check-base.")
  transplanted = jlora.peft.load(d, other, model_type=arch, check_base=False)
  assert jlora._checkpoint.adapter_weights(transplanted).keys() == jlora._checkpoint.adapter_weights(lp).keys()
  # An adapters-only half cannot name its base: nothing is recorded, and loading it warns.
  adapters_only = jlora.peft.save(str(tmp_path / "half"), jlora.split(lp)[0], model_type=arch)
  assert jlora.peft.read_base_fingerprint(adapters_only) is None
