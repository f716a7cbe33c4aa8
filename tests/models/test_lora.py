"""LoRA on the native decoder: dense oracle, layouts, remat, and PEFT export/import vs real PEFT."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

import jlora
import jlora.models
import jlora.peft
from families import IDS, lora_init
from families import FAMILIES
from helpers import oracle_params

peft = pytest.importorskip("peft")


def _rel_err(got, want) -> float:
  return float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max() / np.abs(want).max())


def _torch(f):
  return transformers.AutoModelForCausalLM.from_pretrained(f.directory, attn_implementation=FAMILIES[f.name][2]).eval()


def _torch_logits(m) -> np.ndarray:
  with torch.no_grad():
    return m(torch.as_tensor(IDS)).logits.numpy()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_layout_is_what_the_model_does(family, name):
  f = family(name)
  # The declared layouts (used without tracing) equal what jlora's probe sees the forward do.
  assert jlora.infer_layout(f.model, f.params, jnp.asarray(IDS[:, :4])) == f.model.layout
  assert set(f.model.layout) == {p for p, _ in jlora._tree.leaves_with_paths(f.params)
                                 if p.endswith(("/kernel", "/embedding"))}


def test_lora_matches_dense_oracle_and_zero_b_is_the_base(family):
  f = family("gemma2")  # tied embedding (adapted in both uses), soft-capping, sandwich norms
  cfg = jlora.LoraConfig(rank=4, alpha=8, targets=[f.model.targets("all-linear"), "embed_tokens/embedding"])
  lp = lora_init(f, cfg)
  assert jlora.count(lp).num_adapters == 7 + 1  # 7 stacked kinds (one adapter per kind) + embedding
  fwd = jax.jit(jlora.wrap(f.model))
  base = np.asarray(f.forward(f.params, jnp.asarray(IDS)))
  # B = 0: the base output, up to XLA compiling the scanned body with the extra (zero) adds
  # fused differently (float32 sums reordered: a few ulps per layer, 1e-6 of the logit scale).
  assert _rel_err(fwd(lp, jnp.asarray(IDS)), base) < 1e-5
  lp = lora_init(f, cfg, scale=0.2)
  got = np.asarray(fwd(lp, jnp.asarray(IDS)))
  assert _rel_err(got, base) > 1e-2
  # W0 + scale·A⊗B built densely in float64 (tests/helpers.py), run through the plain model.
  assert _rel_err(got, f.forward(oracle_params(lp), jnp.asarray(IDS))) < 1e-4
  assert _rel_err(got, f.forward(jlora.merge(lp), jnp.asarray(IDS))) < 1e-4


@pytest.mark.slow  # remat="full" also runs in the command's tests (--remat)
def test_remat_policies_give_the_same_gradients(family):
  f = family("llama2")
  lp = lora_init(f, jlora.LoraConfig(rank=4, targets=f.model.targets("all-linear")), scale=0.1)
  adapters, frozen = jlora.split(lp)
  grads = {}
  for remat in ("none", "full", "dots"):
    model = dataclasses.replace(f.model, remat=remat)
    loss = lambda a: jnp.mean(jlora.wrap(model)(jlora.combine(a, frozen), jnp.asarray(IDS)) ** 2)
    grads[remat] = jax.jit(jax.grad(loss))(adapters)
  # Recomputation reorders float32 sums (XLA fuses the rematerialised forward differently): errors
  # of a few float32 ulps of the largest entry, far below any real difference between policies.
  for remat in ("full", "dots"):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * float(np.abs(y).max())),
                 grads[remat], grads["none"])


def _train(f, lp, steps=3):
  adapters, frozen = jlora.split(lp)
  tx = jlora.optimizer(optax.adam(3e-2), adapters)
  state = tx.init(adapters)
  wrapped = jlora.wrap(f.model)
  ids = jnp.asarray(IDS)

  @jax.jit
  def step(adapters, state):
    def loss(a):
      logits = wrapped(jlora.combine(a, frozen), ids)
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    g = jax.grad(loss)(adapters)
    u, state = tx.update(g, state, adapters)
    return optax.apply_updates(adapters, u), state

  for _ in range(steps):
    adapters, state = step(adapters, state)
  return jlora.combine(adapters, frozen)


@pytest.mark.parametrize("name", ["qwen2", "gemma2"])
def test_finetuned_adapter_exports_to_peft_with_matching_logits(family, name, tmp_path):
  f = family(name)
  rules = [jlora.Rule(pattern="layers/mlp/(up_proj|down_proj)/kernel", rank=6, alpha=3.0),
           f.model.targets("q_proj,k_proj,v_proj,o_proj,gate_proj")]
  lp = _train(f, lora_init(f, jlora.LoraConfig(rank=4, alpha=8, targets=rules)))
  want = np.asarray(jlora.wrap(f.model)(lp, jnp.asarray(IDS)))
  d = jlora.peft.save(str(tmp_path / "peft"), lp, module_map=f.model.module_map, base_model_name_or_path=f.directory)
  with open(os.path.join(d, "adapter_config.json")) as fh:
    cfg = json.load(fh)
  assert len(cfg["target_modules"]) == 7 * f.model.config.num_layers
  assert cfg["target_modules"][0] == "model.layers.0.mlp.down_proj"
  pm = peft.PeftModel.from_pretrained(_torch(f), d).eval()
  # float32 both sides, as in test_parity (summation order only).
  assert _rel_err(_torch_logits(pm), want) < 1e-4
  assert _rel_err(want, f.torch_logits()) > 1e-3  # the adapter matters
  # The merged model, written by jlora.models.save, is a plain transformers checkpoint.
  merged_dir = jlora.models.save(str(tmp_path / "merged"), f.model, jlora.merge(lp))
  assert _rel_err(_torch_logits(transformers.AutoModelForCausalLM.from_pretrained(
      merged_dir, attn_implementation=FAMILIES[name][2]).eval()), want) < 1e-4
  # Import gives back the very same adapters.
  back = jlora.peft.load(d, f.params, module_map=f.model.module_map, layout=f.model.layout)
  a, b = jlora._checkpoint.adapter_weights(lp), jlora._checkpoint.adapter_weights(back)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].spec == dataclasses.replace(b[k].spec, dropout=a[k].spec.dropout)
    np.testing.assert_array_equal(np.asarray(a[k].a), np.asarray(b[k].a))
    np.testing.assert_array_equal(np.asarray(a[k].b), np.asarray(b[k].b))


def test_peft_adapter_on_some_layers_imports_with_matching_logits(family, tmp_path):
  f = family("llama3")
  pcfg = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                         layers_to_transform=[1], rank_pattern={"down_proj": 2})
  pm = peft.get_peft_model(_torch(f), pcfg)
  torch.manual_seed(1)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_" in n:
        p.normal_(0, 0.3)
  pm.eval()
  pm.save_pretrained(str(tmp_path / "p"))
  lp = jlora.peft.load(str(tmp_path / "p"), f.params, module_map=f.model.module_map, layout=f.model.layout)
  ws = jlora._checkpoint.adapter_weights(lp)
  assert sorted(ws) == ["layers/mlp/down_proj/kernel", "layers/self_attn/q_proj/kernel", "layers/self_attn/v_proj/kernel"]
  assert ws["layers/mlp/down_proj/kernel"].spec.rank == 2
  assert not np.asarray(ws["layers/self_attn/q_proj/kernel"].b)[[0, 2]].any()  # layers 0 and 2 untouched
  assert _rel_err(np.asarray(jlora.wrap(f.model)(lp, jnp.asarray(IDS))), _torch_logits(pm)) < 1e-4


def test_peft_refusals_for_the_native_layout(family, tmp_path):
  f = family("llama3")  # tied embeddings
  lp = lora_init(f, jlora.LoraConfig(rank=2, targets="embed_tokens/embedding"))
  with pytest.raises(jlora.peft.PeftFormatError, match="tied to the output projection"):
    jlora.peft.save(str(tmp_path / "x"), lp, module_map=f.model.module_map)
  # Layers of one stacked kernel must share rank and alpha.
  pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern={"model.layers.1.self_attn.q_proj": 2})
  peft.get_peft_model(_torch(f), pcfg).save_pretrained(str(tmp_path / "p"))
  with pytest.raises(jlora.peft.PeftFormatError, match="stacked parameter 'layers/self_attn/q_proj/kernel'"):
    jlora.peft.load(str(tmp_path / "p"), f.params, module_map=f.model.module_map, layout=f.model.layout)
  with pytest.raises(ValueError, match=r"'layers/self_attn/q_proj/kernel' is stacked over 3 layers"):
    f.model.module_map.to_module("layers/self_attn/q_proj/kernel", ())
  with pytest.raises(ValueError, match=r"\['wq'\] are not modules of this llama model"):
    f.model.targets("q_proj,wq")


def test_generation_serves_adapters_unmerged_and_passes_keyword_arguments(family):
  f = family("llama2")
  lp = lora_init(f, jlora.LoraConfig(rank=4, dropout=0.5, targets=f.model.targets("all-linear")), scale=0.3)
  prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]  # as in test_parity: the plain loop is compiled there
  got = jlora.models.generate(f.model, lp, prompts, max_new_tokens=10, eos_id=())
  assert got == jlora.models.generate(f.model, jlora.merge(lp), prompts, max_new_tokens=10, eos_id=())
  assert got != jlora.models.generate(f.model, f.params, prompts, max_new_tokens=10, eos_id=())
  # Extra keyword arguments reach every wrapped call: here jlora.wrap's lora_rng turns on LoRA dropout.
  dropped = jlora.models.generate(f.model, lp, prompts, max_new_tokens=10, eos_id=(), lora_rng=jax.random.key(3))
  assert dropped != got
