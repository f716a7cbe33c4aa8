"""Mixture-of-experts families against PyTorch transformers 4.57.6, part 2: greedy generation through the KV
cache, ``save`` (the checkpoint's own layout, loaded by transformers), gpt-oss' MXFP4 experts, and a checkpoint
missing an expert's tensor. (Part 1, tests/models/test_moe.py: logits, routers, dispatches, losses, conventions.)"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import jlora.models
from families import IDS, MOE_FAMILIES, PROMPTS, torch_greedy

NAMES = list(MOE_FAMILIES)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_matches_transformers(family, name):
  f = family(name)
  prompts = PROMPTS
  want = torch_greedy(f.torch_model, prompts, max_new_tokens=10)
  # Prefill, then one token at a time through the KV cache (left padding; test_parity covers right padding
  # and stopping, which the experts do not change).
  assert jlora.models.generate(f.model, f.params, prompts, max_new_tokens=10, eos_id=()) == want


@pytest.mark.parametrize("name", NAMES)
def test_save_writes_the_checkpoint_layout_and_loads_in_transformers(family, name, tmp_path):
  f = family(name)
  d = jlora.models.save(str(tmp_path / "f32"), f.model, f.params)
  model, params = jlora.models.load(d)
  assert model == f.model
  jax.tree.map(np.testing.assert_array_equal, params, f.params)  # bit for bit
  # The checkpoint's own tensors (one per expert; gpt-oss' 3-D experts), with the same values.
  original = load_file(os.path.join(f.directory, "model.safetensors"))
  saved = load_file(os.path.join(d, "model.safetensors"))
  assert saved.keys() == original.keys()
  for k in original:
    np.testing.assert_array_equal(saved[k], original[k], err_msg=k)
  tm = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation=MOE_FAMILIES[name][2]).eval()
  with torch.no_grad():
    np.testing.assert_array_equal(tm(torch.as_tensor(IDS)).logits.numpy(), f.torch_logits())
  # bfloat16 round trip.
  model16, params16 = jlora.models.load(f.directory, dtype="bfloat16")
  d16 = jlora.models.save(str(tmp_path / "bf16"), model16, params16)
  assert {v.dtype.name for v in load_file(os.path.join(d16, "model.safetensors")).values()} == {"bfloat16"}
  jax.tree.map(np.testing.assert_array_equal, jlora.models.load(d16, dtype="bfloat16")[1], params16)


# -- gpt-oss MXFP4 --------------------------------------------------------------------------------------------

_FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def _mxfp4_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(E, in, out)`` -> MXFP4 ``blocks (E, out, in/32, 16)`` and ``scales (E, out, in/32)`` as the released
  gpt-oss checkpoints store them (shared/reference/moe.md §2): rows are output features, blocks of 32 inputs
  share an E8M0 exponent (the smallest with |x| / 2**s <= 6), the codes are the nearest e2m1 values with
  bit 3 the sign, two per byte, the first in the low nibble."""
  rows = np.transpose(w.astype(np.float32), (0, 2, 1))
  e, r, n = rows.shape
  x = rows.reshape(e, r, n // 32, 32)
  mant, exp = np.frexp(np.abs(x).max(-1) / np.float32(6.0))  # amax / 6 = mant * 2**exp, mant in [0.5, 1)
  exp = np.clip(np.where(mant == 0, -127, np.where(mant == 0.5, exp - 1, exp)), -127, 127).astype(np.int32)
  y = np.ldexp(x, -exp[..., None])
  code = np.abs(np.abs(y)[..., None] - _FP4).argmin(-1).astype(np.uint8) | (np.signbit(y).astype(np.uint8) << 3)
  blocks = code[..., 0::2] | (code[..., 1::2] << 4)
  # Contiguous: safetensors' numpy writer stores the buffer as laid out in memory.
  return np.ascontiguousarray(blocks.astype(np.uint8)), np.ascontiguousarray((exp + 127).astype(np.uint8))


def _mxfp4_checkpoint(src: str, dst: str) -> str:
  tensors = load_file(os.path.join(src, "model.safetensors"))
  for k in [k for k in tensors if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]:
    tensors[k + "_blocks"], tensors[k + "_scales"] = _mxfp4_quantize(tensors.pop(k))
  os.makedirs(dst)
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(src, "config.json")) as fh:
    config = json.load(fh)
  config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
      "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
  with open(os.path.join(dst, "config.json"), "w") as fh:
    json.dump(config, fh)
  return dst


def test_mxfp4_experts_decode_as_transformers_does(family, tmp_path):
  from transformers.integrations.mxfp4 import convert_moe_packed_tensors

  f = family("gpt_oss")
  q = _mxfp4_checkpoint(f.directory, str(tmp_path / "mxfp4"))
  packed = load_file(os.path.join(q, "model.safetensors"))
  model, params = jlora.models.load(q)
  model16, params16 = jlora.models.load(q, dtype="bfloat16")
  experts, experts16 = params["layers"]["mlp"]["experts"], params16["layers"]["mlp"]["experts"]
  for i in range(model.config.num_layers):
    for proj in ("gate_up_proj", "down_proj"):
      name = f"model.layers.{i}.mlp.experts.{proj}"
      theirs = convert_moe_packed_tensors(torch.as_tensor(packed[name + "_blocks"]),
                                          torch.as_tensor(packed[name + "_scales"]))  # bf16 (E, in, out)
      np.testing.assert_array_equal(np.asarray(experts[proj]["kernel"][i]), theirs.float().numpy(), err_msg=name)
      np.testing.assert_array_equal(np.asarray(experts16[proj]["kernel"][i]).astype(np.float32),
                                    theirs.float().numpy(), err_msg=name)
      # And the quantization is the format's: close to the dense weights it came from.
      dense = np.asarray(f.params["layers"]["mlp"]["experts"][proj]["kernel"][i])
      assert np.abs(np.asarray(experts[proj]["kernel"][i]) - dense).max() < 0.2 * np.abs(dense).max()
  # transformers' own loader (CPU: it dequantizes to bf16) builds the same experts from the directory.
  tm = transformers.AutoModelForCausalLM.from_pretrained(
      q, quantization_config=transformers.Mxfp4Config(dequantize=True))
  for i, layer in enumerate(tm.model.layers):
    np.testing.assert_array_equal(layer.mlp.experts.down_proj.detach().float().numpy(),
                                  np.asarray(experts["down_proj"]["kernel"][i]))
  # save writes the dense layout (the decoded kernels), which transformers loads as a plain model.
  d = jlora.models.save(str(tmp_path / "dense"), model, params)
  with open(os.path.join(d, "config.json")) as fh:
    assert "quantization_config" not in json.load(fh)
  tm = transformers.AutoModelForCausalLM.from_pretrained(d)
  np.testing.assert_array_equal(tm.model.layers[1].mlp.experts.gate_up_proj.detach().numpy(),
                                np.asarray(experts["gate_up_proj"]["kernel"][1]))


def test_a_checkpoint_missing_an_expert_tensor_names_it(family, tmp_path):
  f = family("mixtral")
  d = str(tmp_path / "missing")
  os.makedirs(d)
  tensors = load_file(os.path.join(f.directory, "model.safetensors"))
  del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
  save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(f.directory, "config.json")) as src, open(os.path.join(d, "config.json"), "w") as dst:
    dst.write(src.read())
  with pytest.raises(jlora.models.CheckpointError,
                     match=r"1 weights are missing: model\.layers\.1\.block_sparse_moe\.experts\.5\.w3\.weight"):
    jlora.models.load(d)
