"""Pre-quantized ``*-bnb-4bit`` checkpoints through ``jlora.models.load`` / ``save``.

The references: transformers quantizes each family's checkpoint with bitsandbytes on CPU
(``BitsAndBytesConfig``: NF4, double quantization) and saves it as a ``*-bnb-4bit``
directory; the PyTorch 4-bit model gives the logits, and transformers reads what jlora writes."""

from __future__ import annotations

import filecmp
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.models
from families import IDS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from bnb_reference import bnb  # noqa: E402  (bitsandbytes on its generic CPU path: right on every CPU)

# qwen2: biases, GQA, lm_head; llama3: tied embeddings, llama3 RoPE. hidden 32 / intermediate 48:
# NF4 blocks of 64 straddle rows (the flat storage layout) in every kernel.
NAMES = ["qwen2", "llama3"]
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _rel_err(got, want) -> float:
  return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def _quantized_by_transformers(directory: str, out: str, *, quant_type: str = "nf4", double_quant: bool = True):
  qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                         bnb_4bit_use_double_quant=double_quant,
                                         bnb_4bit_compute_dtype=torch.float32)
  qm = transformers.AutoModelForCausalLM.from_pretrained(directory, quantization_config=qcfg, device_map="cpu",
                                                         dtype=torch.float32).eval()
  qm.save_pretrained(out)
  return qm


@pytest.fixture(scope="module")
def bnb4(family, tmp_path_factory):
  """``bnb4(name)`` -> (family, transformers' 4-bit model, its *-bnb-4bit directory, jlora model, params)."""
  cache = {}

  def get(name):
    if name not in cache:
      f = family(name)
      d = str(tmp_path_factory.mktemp(f"{name}-bnb-4bit"))
      qm = _quantized_by_transformers(f.directory, d)
      model, params = jlora.models.load(d)
      cache[name] = (f, qm, d, model, params)
    return cache[name]

  return get


@pytest.mark.parametrize("name", NAMES)
def test_load_bnb_4bit_checkpoint_matches_transformers(bnb4, name):
  f, qm, d, model, params = bnb4(name)
  assert model == f.model
  layers = params["layers"]
  for kind in ("self_attn", "mlp"):
    for proj, node in layers[kind].items():
      if proj not in LINEAR:
        continue
      q = node["kernel"]
      # One stacked node per kernel (the layers lax.scan slices), decoding to bitsandbytes' values exactly.
      assert isinstance(q, jlora.NF4Weight) and q.format.stack == 1 and q.shape == f.params["layers"][kind][proj][
          "kernel"].shape
      deq = np.asarray(q.dequantize())
      for i in range(f.model.config.num_layers):
        w = qm.get_submodule(f"model.layers.{i}.{kind}.{proj}").weight
        np.testing.assert_array_equal(deq[i], bnb.functional.dequantize_4bit(w.data, w.quant_state).numpy().T)
  assert not isinstance(params["embed_tokens"]["embedding"], jlora.NF4Weight)
  with torch.no_grad():
    want = qm(torch.as_tensor(IDS)).logits.numpy()
  got = jax.jit(jlora.wrap(model))(params, jnp.asarray(IDS))
  # The same dequantized float32 weights on both sides (checked above), float32 compute: only the
  # summation orders differ, as in test_parity's float32 check (~1e-6 of the logits' scale; a
  # wrong layer, transposition or block order moves them by > 1e-2).
  assert _rel_err(got, want) < 1e-4
  # The base fingerprint is that of the unquantized checkpoint (codes are bit-exact), so adapters
  # trained on either load onto the other.
  assert jlora.fingerprint(params) == jlora.fingerprint(f.params)


@pytest.mark.parametrize("name", NAMES)
def test_save_writes_the_bnb_checkpoint_back_byte_for_byte(bnb4, name, tmp_path):
  f, qm, d, model, params = bnb4(name)
  out = jlora.models.save(str(tmp_path / "back"), model, params)
  assert filecmp.cmp(os.path.join(out, "model.safetensors"), os.path.join(d, "model.safetensors"), shallow=False)
  read = lambda p: json.load(open(os.path.join(p, "config.json")))
  assert read(out)["quantization_config"] == read(d)["quantization_config"]
  tm = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32).eval()
  assert isinstance(tm.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
  with torch.no_grad():
    np.testing.assert_array_equal(tm(torch.as_tensor(IDS)).logits.numpy(), qm(torch.as_tensor(IDS)).logits.numpy())
  # Merged or dequantized, the model saves as a plain checkpoint (no quantization_config).
  dense = jlora.models.save(str(tmp_path / "dense"), model, jlora.dequantize(params))
  assert "quantization_config" not in read(dense)
  back = jlora.models.load(dense)[1]
  jax.tree.map(np.testing.assert_array_equal, back, jlora.dequantize(params))


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_quantized_in_jax_loads_in_transformers(family, tmp_path, quant_type, double_quant):
  f = family("qwen2")
  targets = r"layers/.*_proj/kernel"
  qp = jlora.quantize(f.params, targets=targets, layout=f.model.layout, quant_type=quant_type,
                      double_quant=double_quant)
  out = jlora.models.save(str(tmp_path / "q"), f.model, qp)
  qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
  assert (qc["bnb_4bit_quant_type"], qc["bnb_4bit_use_double_quant"], qc["load_in_4bit"]) == (
      quant_type, double_quant, True)
  tm = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32).eval()
  assert isinstance(tm.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
  with torch.no_grad():
    want = tm(torch.as_tensor(IDS)).logits.numpy()
  # bitsandbytes decodes jlora's bytes to jlora's values exactly (tests/quant/test_bnb_checkpoints.py):
  # float32 summation order only, as above.
  assert _rel_err(jax.jit(jlora.wrap(f.model))(qp, jnp.asarray(IDS)), want) < 1e-4
  # load(save(q)) is the same tree, bit for bit.
  model, back = jlora.models.load(out)
  jax.tree.map(np.testing.assert_array_equal, back, qp)


def test_save_refusals(family, tmp_path):
  f = family("qwen2")
  lay = f.model.layout
  with pytest.raises(ValueError, match=r"\['layers/self_attn/q_proj/kernel', .*\] are not 4-bit while other "
                                       r"linear kernels are: .*Quantize every linear kernel but lm_head, or none"):
    jlora.models.save(str(tmp_path / "a"), f.model, jlora.quantize(f.params, targets=r"layers/mlp/.*/kernel",
                                                                   layout=lay))
  with pytest.raises(ValueError, match=r"'lm_head/kernel' is 4-bit: transformers keeps lm_head unquantized"):
    jlora.models.save(str(tmp_path / "b"), f.model, jlora.quantize(f.params, targets=r".*_proj/kernel|lm_head/kernel",
                                                                   layout=lay))
  mixed = jlora.quantize(jlora.quantize(f.params, targets=r"layers/mlp/.*/kernel", layout=lay),
                         targets=r"layers/self_attn/.*/kernel", layout=lay, double_quant=False)
  with pytest.raises(ValueError, match=r"4-bit kernels of several formats .*Quantize them alike"):
    jlora.models.save(str(tmp_path / "c"), f.model, mixed)
  assert not os.path.exists(tmp_path / "a")  # nothing written on a refusal


def test_load_refusals(bnb4, tmp_path):
  f, qm, d, model, params = bnb4("qwen2")
  bad = tmp_path / "bad"
  shutil.copytree(d, bad)
  cfg = json.load(open(bad / "config.json"))
  cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
  json.dump(cfg, open(bad / "config.json", "w"))
  with pytest.raises(jlora.models.CheckpointError, match=r"quant_method 'gptq'; jlora.models reads bitsandbytes "
                                                         r"4-bit checkpoints \(\*-bnb-4bit\) only"):
    jlora.models.load(str(bad))
  cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
  json.dump(cfg, open(bad / "config.json", "w"))
  with pytest.raises(jlora.models.CheckpointError, match=r"bitsandbytes 8-bit \(LLM.int8\) checkpoint"):
    jlora.models.load(str(bad))
  # One layer's weight dense, the other's 4-bit: not one stacked format.
  from safetensors.numpy import load_file, save_file

  state = load_file(os.path.join(d, "model.safetensors"))
  p = "model.layers.1.mlp.up_proj.weight"
  state = {k: v for k, v in state.items() if not k.startswith(p + ".")}
  state[p] = np.asarray(f.params["layers"]["mlp"]["up_proj"]["kernel"][1]).T.copy()
  shutil.rmtree(bad)
  shutil.copytree(d, bad)
  save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(jlora.models.CheckpointError, match=r"'layers/mlp/up_proj/kernel' is stored in 4 bits in "
                                                         r"some layers but not in \['model.layers.1.mlp.up_proj"):
    jlora.models.load(str(bad))
