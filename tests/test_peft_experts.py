"""PEFT interop on routed experts, against real PEFT 0.21.2 on transformers 4.57.6's MoE classes.

* Mixtral / Qwen3-MoE: experts are per-expert ``nn.Linear`` modules (``experts.{e}.w1`` /
  ``experts.{e}.gate_proj``); a PEFT adapter made in PyTorch imports with logits parity, and
  jlora's export loads in ``PeftModel`` with logits parity.
* gpt-oss: experts are two 3-D parameters per layer, PEFT ``target_parameters``. PEFT on
  transformers 4.57 swaps in and out (lora_A on the output side): ``fused_layout="peft_swapped"``,
  checked both ways against PEFT. ``"input_side"`` (transformers >= 5, vLLM) is checked against
  PEFT's own transformers-5 code path (the experts marked ``is_transposed``, as v5 marks them) and
  against vLLM's loader arithmetic transcribed below; vLLM itself is not run (no GPU, not installed).
Parity for gpt-oss is per MoE block, on the inputs the PyTorch model feeds each block (the JAX side
does not reproduce its sink attention).
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.peft
from experts import hf_moe
from helpers import assert_close

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

IDS = np.random.default_rng(0).integers(0, 64, (2, 5))
TOL = dict(rtol=2e-4, atol=2e-4)


def _random_adapters(params, targets, *, rank=3, alpha=5.0, seed=4):
  lp = jlora.init(jax.random.key(seed), params, jlora.LoraConfig(rank=rank, alpha=alpha, targets=targets),
                  layout=hf_moe.layout(params))
  rng = np.random.default_rng(seed)
  fill = lambda w: w.replace(a=jnp.asarray(0.3 * rng.standard_normal(w.a.shape), w.a.dtype),
                             b=jnp.asarray(0.3 * rng.standard_normal(w.b.shape), w.b.dtype))
  return jax.tree.map(lambda w: fill(w) if isinstance(w, jlora.LoraWeight) else w, lp,
                      is_leaf=lambda w: isinstance(w, jlora.LoraWeight))


def _load(directory, params, family, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", jlora.peft.UnverifiedBaseWarning)
    return jlora.peft.load(directory, params, module_map=hf_moe.module_map(family), layout=hf_moe.layout(params), **kw)


def _same_factors(got, want):
  for g, w in zip(jax.tree.leaves(got, is_leaf=lambda x: isinstance(x, jlora.LoraWeight)),
                  jax.tree.leaves(want, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))):
    if isinstance(w, jlora.LoraWeight):
      assert isinstance(g, jlora.LoraWeight) and g.spec == w.spec, (g, w)
      np.testing.assert_allclose(np.asarray(g.a), np.asarray(w.a), rtol=0, atol=0)
      np.testing.assert_allclose(np.asarray(g.b), np.asarray(w.b), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_per_expert_modules_import_and_export_with_logits_parity(family, tmp_path):
  model, cfg = hf_moe.tiny(family)
  params = hf_moe.jax_params(model, family)
  forward = jax.jit(jlora.wrap(lambda p, ids: hf_moe.forward(p, ids, cfg)))
  base = model(torch.as_tensor(IDS)).logits.detach().numpy()
  experts = ["gate_proj", "up_proj", "down_proj"] if family == "qwen3_moe" else ["w1", "w2", "w3"]
  # A PEFT adapter made in PyTorch (per-expert lora.Linear, attention too) -> jlora.
  pm = hf_moe.randomize_lora(peft.get_peft_model(
      copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=5, target_modules=[*experts, "q_proj"])))
  pm.save_pretrained(tmp_path / "peft")
  assert any(".experts.3." in k for k in peft.get_peft_model_state_dict(pm))
  want = pm(torch.as_tensor(IDS)).logits.detach().numpy()
  lp = _load(tmp_path / "peft", params, family)
  assert lp["layers"]["mlp"]["experts"]["up_proj"]["kernel"].a.shape == (2, 4, 16, 2)
  got = forward(lp, IDS)
  assert np.abs(want - base).max() > 0.1, "the adapter had no effect"
  assert_close(got, want, **TOL)
  # jlora's export -> PeftModel.
  lp2 = _random_adapters(params, r"layers/(mlp/experts/.*|self_attn/q_proj)/kernel", rank=2)  # (lp's structure)
  jlora.peft.save(str(tmp_path / "jlora"), lp2, module_map=hf_moe.module_map(family))
  config = json.load(open(tmp_path / "jlora" / "adapter_config.json"))
  assert f"model.layers.1.{'mlp' if family == 'qwen3_moe' else 'block_sparse_moe'}.experts.3.{experts[1]}" in \
      config["target_modules"]
  pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "jlora"))
  assert_close(forward(lp2, IDS), pm2(torch.as_tensor(IDS)).logits.detach().numpy(), **TOL)
  _same_factors(_load(tmp_path / "jlora", params, family), lp2)  # round trip


def _gpt_oss_parity(pm, lp, cfg):
  ins, outs, _ = hf_moe.mlp_io(pm, IDS, "gpt_oss")
  got = jax.jit(jlora.wrap(lambda p, x: hf_moe.gpt_oss_blocks(p, x, cfg)))(lp, jnp.asarray(ins))
  assert_close(got, outs, **TOL)
  return outs


def _vllm_deltas(tensors, layer, experts, scale):
  """vLLM's reading of a 3-D MoE adapter (vllm/lora/model_manager.py ``_stack_moe_lora_weights`` for
  ``is_3d_moe_weight`` models, then FusedMoE3DWithLoRA's slots): ``experts.base_layer`` is gate_up and
  ``experts`` is down; lora_a -> (E, r, input_size), lora_b -> (out, r, E) -> permute(2, 0, 1) =
  (E, out, r). The delta of expert e, in vLLM's [out, in] orientation, is scale·B_e·A_e."""
  out = {}
  for name, key in (("gate_up_proj", "experts.base_layer"), ("down_proj", "experts")):
    prefix = f"base_model.model.model.layers.{layer}.mlp.{key}"
    a = tensors[f"{prefix}.lora_A.weight"]
    b = tensors[f"{prefix}.lora_B.weight"]
    a = a.reshape(experts, -1, a.shape[-1])
    b = b.reshape(b.shape[0], -1, experts).transpose(2, 0, 1)
    out[name] = scale * np.einsum("eor,eri->eoi", b, a)
  return out


def test_gpt_oss_target_parameters_both_layouts_each_against_its_reader(tmp_path):
  from safetensors.numpy import load_file

  model, cfg = hf_moe.tiny("gpt_oss")  # H = 16, I = 12: the shapes tell the layouts apart
  params = hf_moe.jax_params(model, "gpt_oss")
  targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
  # PEFT 0.21.2 on transformers 4.57.6 (lora_A on the output side) -> jlora; the layout from the shapes.
  pm = hf_moe.randomize_lora(peft.get_peft_model(
      copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=targets)))
  pm.save_pretrained(tmp_path / "peft")
  shapes = {k: v.shape for k, v in peft.get_peft_model_state_dict(pm).items() if ".layers.0." in k}
  assert shapes["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"] == (8, 24)  # [E·r, 2I]
  assert shapes["base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"] == (16, 8)  # [H, r·E]
  lp = _load(tmp_path / "peft", params, "gpt_oss")
  outs = _gpt_oss_parity(pm, lp, cfg)
  assert np.abs(outs - hf_moe.mlp_io(model, IDS, "gpt_oss")[1]).max() > 0.1, "the adapter had no effect"

  # jlora -> PEFT on transformers 4.57: "peft_swapped".
  lp2 = _random_adapters(params, r"layers/mlp/experts/.*/kernel", rank=2, alpha=6.0)
  with pytest.raises(ValueError, match=r"fused_layout=None.*'peft_swapped'.*'input_side'"):
    jlora.peft.save(str(tmp_path / "x"), lp2, module_map=hf_moe.module_map("gpt_oss"))
  jlora.peft.save(str(tmp_path / "swapped"), lp2, module_map=hf_moe.module_map("gpt_oss"), fused_layout="peft_swapped")
  config = json.load(open(tmp_path / "swapped" / "adapter_config.json"))
  assert config["target_modules"] == [] and config["lora_dropout"] == 0.0
  assert config["target_parameters"] == [f"model.layers.{i}.mlp.experts.{n}" for i in (0, 1)
                                         for n in ("down_proj", "gate_up_proj")]
  _gpt_oss_parity(peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "swapped")), lp2, cfg)

  # "input_side": PEFT's transformers-5 code path (the experts marked is_transposed, as v5 marks them).
  jlora.peft.save(str(tmp_path / "input"), lp2, module_map=hf_moe.module_map("gpt_oss"), fused_layout="input_side")
  v5 = copy.deepcopy(model)
  for layer in v5.model.layers:
    layer.mlp.experts.is_transposed = True
  _gpt_oss_parity(peft.PeftModel.from_pretrained(v5, str(tmp_path / "input")), lp2, cfg)
  # Each layout fails in the other reader (size mismatch), rather than loading transposed.
  with pytest.raises(RuntimeError, match="size mismatch"):
    peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "input"))

  # vLLM (transcribed): input sizes H for gate_up and I for down, and the same per-expert update.
  tensors = load_file(str(tmp_path / "input" / "adapter_model.safetensors"))
  for i in (0, 1):
    deltas = _vllm_deltas(tensors, i, 4, 6.0 / 2)
    for name, (din, dout) in (("gate_up_proj", (16, 24)), ("down_proj", (12, 16))):
      w = lp2["layers"]["mlp"]["experts"][name]["kernel"]
      assert deltas[name].shape == (4, dout, din)
      want = w.spec.scale * np.einsum("eir,ero->eoi", np.asarray(w.a[i]), np.asarray(w.b[i]))
      assert_close(deltas[name], want, rtol=1e-6, atol=1e-6)
  # Round trips (the recorded layout is read back).
  _same_factors(_load(tmp_path / "swapped", params, "gpt_oss"), lp2)
  _same_factors(_load(tmp_path / "input", params, "gpt_oss"), lp2)
  with pytest.raises(jlora.peft.PeftFormatError, match=r"saved with fused_layout='input_side', loaded with 'peft_swapped'"):
    _load(tmp_path / "input", params, "gpt_oss", fused_layout="peft_swapped")


def test_square_expert_parameters_need_the_layout_named(tmp_path):
  from safetensors.numpy import load_file, save_file

  params = {"layers": {"mlp": {"experts": {"down_proj": {"kernel": jnp.ones((2, 3, 8, 8))}}}}}
  lay = {"layers/mlp/experts/down_proj/kernel": jlora.KernelLayout(batch_axes=(0, 1), in_axes=(2,))}
  mm = jlora.peft.ModuleMap(to_module=lambda p, idx: f"model.layers.{idx[0]}.mlp.experts.down_proj",
                            fused_experts=r".*/experts/.*")
  lp = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets=".*/kernel"), layout=lay)
  lp = jax.tree.map(lambda w: w.replace(b=jnp.full(w.b.shape, 0.5)) if isinstance(w, jlora.LoraWeight) else w, lp,
                    is_leaf=lambda w: isinstance(w, jlora.LoraWeight))
  jlora.peft.save(str(tmp_path), lp, module_map=mm, fused_layout="input_side")
  path = os.path.join(tmp_path, "adapter_model.safetensors")
  save_file(load_file(path), path)  # as PEFT would write it: no recorded layout
  load = lambda **kw: jlora.peft.load(str(tmp_path), params, module_map=mm, layout=lay, check_base=False, **kw)
  with pytest.raises(jlora.peft.PeftFormatError, match=r"cannot tell where lora_A sits.*fused_layout='peft_swapped'"):
    load()
  _same_factors(load(fused_layout="input_side"), lp)
  dora = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets=".*/kernel", dora=True), layout=lay)
  with pytest.raises(jlora.peft.PeftFormatError, match=r"DoRA adapter on experts stored as one 3-D parameter"):
    jlora.peft.save(str(tmp_path / "dora"), dora, module_map=mm, fused_layout="input_side")
