"""DoRA, PiSSA/OLoRA and AdaLoRA adapters against real PyTorch PEFT: jlora exports load in
``PeftModel`` with the same logits, PEFT-trained adapters load in jlora with the same logits."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import jlora
import jlora.peft
from hf_models import IDS, TARGETS, flax_logits, hf_base, targets_regex, torch_logits, torch_model, train_jlora, train_torch

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

# float32 on both sides, PyTorch and XLA summing in other orders: logits of these 2-layer
# models agree to ~1e-6; 2e-5 leaves room without hiding a bug (a wrong norm axis, scale or
# transpose moves logits by > 1e-3).
TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(params=["llama", "gpt2"])
def setup(request):
  return (request.param, *hf_base(request.param))


def _peft_model(arch, out):
  return peft.PeftModel.from_pretrained(torch_model(arch), out).eval()


def test_dora_export_loads_in_peft(setup, tmp_path):
  arch, loaded, lay = setup
  rules = [targets_regex(arch)] + ([r"(.*/)?embed_tokens/embedding"] if arch == "llama" else [])
  lp = jlora.init(jax.random.key(0), loaded.params, jlora.LoraConfig(rank=4, alpha=8, targets=rules, dora=True),
                  layout=lay)
  lp = train_jlora(loaded, lp)
  out = jlora.peft.save(str(tmp_path / "dora"), lp, module_map=loaded.module_map)
  cfg = json.load(open(os.path.join(out, "adapter_config.json")))
  assert cfg["use_dora"] is True
  pm = _peft_model(arch, out)
  want = flax_logits(loaded, lp)
  assert np.abs(want - torch_logits(torch_model(arch))).max() > 1e-3  # the adapter matters
  np.testing.assert_allclose(torch_logits(pm), want, **TOL)
  # PEFT's merge (the norm of the unmerged base) agrees with the unmerged forward (jlora's merge:
  # test_dora.py's oracle tests).
  np.testing.assert_allclose(torch_logits(pm.merge_and_unload()), want, **TOL)


@pytest.mark.parametrize("arch", ["llama"])
def test_peft_trained_dora_loads_in_jlora(arch, tmp_path):
  loaded, _ = hf_base(arch)
  cfg = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS[arch],
                        fan_in_fan_out=arch == "gpt2")
  pm = train_torch(peft.get_peft_model(torch_model(arch), cfg))
  pm.save_pretrained(str(tmp_path / "p"))
  lp = jlora.peft.load(str(tmp_path / "p"), loaded.params, module_map=loaded.module_map, layout=loaded.layout)
  ws = jlora._checkpoint.adapter_weights(lp)
  assert ws and all(isinstance(w.spec.variant, jlora.DoRA) for w in ws.values())
  np.testing.assert_allclose(flax_logits(loaded, lp), torch_logits(pm), **TOL)


# GPT-2 (Conv1D, transposed) with PiSSA; OLoRA on Llama only: PEFT's olora_init ignores
# fan_in_fan_out and gives Conv1D layers wrongly shaped factors.
@pytest.mark.parametrize("arch,init", [("gpt2", "pissa"), ("llama", "olora")])
def test_residual_init_matches_peft_and_exports_onto_the_original_base(arch, init, tmp_path):
  loaded, lay = hf_base(arch, native=False)  # per-layer kernels, as the test indexes them
  lp0 = jlora.init(jax.random.key(0), loaded.params, jlora.LoraConfig(rank=4, alpha=8, targets=targets_regex(arch),
                   init=init), layout=lay)
  # PEFT's own initialisation of the same base: the same residual base and the same s·BA.
  pm0 = peft.get_peft_model(torch_model(arch), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                                             target_modules=TARGETS[arch],
                                                             fan_in_fan_out=arch == "gpt2"))
  d0 = str(tmp_path / "peft-init")
  pm0.save_pretrained(d0)
  residual = {k: v.detach().numpy() for k, v in pm0.named_parameters() if "base_layer.weight" in k}
  ours = jlora.peft.load(d0, loaded.params, module_map=loaded.module_map, layout=loaded.layout)  # PEFT's A0, B0 on the original base
  for path, w in jlora._checkpoint.adapter_weights(lp0).items():
    peft_w = jlora._checkpoint.adapter_weights(ours)[path]
    # s·B·A and the residual W − s·B·A agree (the SVD/QR sign of each component may differ).
    np.testing.assert_allclose(np.asarray(jlora.merge({"x": w.replace(w0=w.w0 * 0)})["x"]),
                               np.asarray(jlora.merge({"x": peft_w.replace(w0=peft_w.w0 * 0)})["x"]),
                               rtol=1e-4, atol=1e-5)
    module = "base_model.model." + path.rsplit("/", 1)[0].replace("/", ".") + ".base_layer.weight"
    res = residual[module].T  # torch Linear (out, in) vs Flax (in, out); Conv1D (in, out) vs Flax (out, in)
    np.testing.assert_allclose(np.asarray(w.w0), res, rtol=1e-4, atol=1e-5)
  # Training sees W_res + s·BA = W at step 0.
  np.testing.assert_allclose(flax_logits(loaded, lp0), torch_logits(torch_model(arch)), rtol=1e-4, atol=1e-5)
  lp = train_jlora(loaded, lp0)
  out = jlora.peft.save(str(tmp_path / "conv"), lp, module_map=loaded.module_map)
  cfg = json.load(open(os.path.join(out, "adapter_config.json")))
  assert cfg["r"] == 8 and cfg["lora_alpha"] == 16  # PEFT's subtract_mutated_init: r×2, alpha×2
  pm = _peft_model(arch, out)  # onto the unmodified model
  want = flax_logits(loaded, lp)
  assert np.abs(want - torch_logits(torch_model(arch))).max() > 1e-3
  np.testing.assert_allclose(torch_logits(pm), want, rtol=1e-4, atol=1e-4)  # W_res rounding: ~1e-6 of ‖W‖
  # The same conversion inside jlora, back onto the original base params.
  plain = jlora.to_lora(lp, base=loaded.params)
  assert all(w.spec.rank == 8 for w in jlora._checkpoint.adapter_weights(plain).values())
  np.testing.assert_allclose(flax_logits(loaded, plain), want, rtol=1e-4, atol=1e-4)


def test_several_dora_adapters_merge_like_peft(tmp_path):
  """PEFT with two active DoRA adapters (each norm from the unmerged base, PEFT #3608) vs
  jlora.variants.merge_adapters of the same two adapters loaded from PEFT's files."""
  loaded, _ = hf_base("llama")
  tm = torch_model("llama")
  cfg = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS["llama"])
  pm = peft.get_peft_model(tm, cfg, adapter_name="one")
  pm.add_adapter("two", peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "up_proj"]))
  torch.manual_seed(5)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_" in n:
        p.add_(torch.randn_like(p) * 0.2)
  pm.save_pretrained(str(tmp_path / "p"))
  pm.base_model.set_adapter(["one", "two"])
  want = torch_logits(pm.eval())
  one = jlora.peft.load(str(tmp_path / "p" / "one"), loaded.params, module_map=loaded.module_map, layout=loaded.layout)  # non-default names: subdirs
  two = jlora.peft.load(str(tmp_path / "p" / "two"), loaded.params, module_map=loaded.module_map, layout=loaded.layout)
  merged = jlora.variants.merge_adapters(one, two)
  ids = np.asarray(IDS)
  got = np.asarray(loaded.forward(merged, ids, np.ones_like(ids)))
  np.testing.assert_allclose(got, want, **TOL)
  # Taking the second norm from the base that already holds the first adapter (the pre-#3608
  # merge) gives other logits.
  first = jlora.merge(one)
  stale = jlora.merge(jax.tree.map(lambda w, b: w.replace(w0=b) if isinstance(w, jlora.LoraWeight) else w, two,
                                   first, is_leaf=lambda x: isinstance(x, jlora.LoraWeight)))
  assert np.abs(np.asarray(loaded.forward(stale, ids, np.ones_like(ids))) - want).max() > 1e-4
