"""QLoRA in the fine-tuning command on the bundled base: ``--quantize nf4``, and a pre-quantized
``*-bnb-4bit`` ``--model``. References: transformers + bitsandbytes (CPU) quantize the same base, and
PEFT loads the exported adapter onto it."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_runs import assert_user_error, finetune

import jlora
import jlora.models
from jlora.finetune import TrainConfig, run
from jlora.finetune import model as model_lib
from jlora.finetune.cli import UserError
from jlora.finetune.config import DEFAULT_MODEL
from jlora.finetune.quantize import quantize_base

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from bnb_reference import bnb  # noqa: E402  (bitsandbytes on its generic CPU path: right on every CPU)

# Few steps, short rows; reproducible=False leaves this process's XLA flags alone. remat: the 4-bit
# kernels are decoded inside the rematerialised scanned layer.
QUICK = dict(steps=6, batch_size=4, max_seq_len=24, rank=4, lr=1e-2, warmup_steps=2, eval_exact_match=2,
             max_new_tokens=2, log_every=1, save_every=6, eval_every=1000, progress=False, reproducible=False,
             remat=True)
IDS = [[5, 7, 11, 13, 2, 3, 9, 1, 40, 41], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]


@pytest.fixture(scope="module")
def bnb_base(tmp_path_factory):
  """The bundled base quantized by transformers + bitsandbytes on CPU (NF4, double quantization):
  the PyTorch 4-bit model and its *-bnb-4bit directory (with the tokenizer, usable as --model)."""
  d = str(tmp_path_factory.mktemp("tiny-base-bnb-4bit"))
  qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.float32)
  qm = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, quantization_config=qcfg, device_map="cpu",
                                                         dtype=torch.float32).eval()
  qm.save_pretrained(d)
  for f in os.listdir(DEFAULT_MODEL):
    if f.startswith(("tokenizer", "special_tokens")):
      shutil.copy(os.path.join(DEFAULT_MODEL, f), d)
  return qm, d


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("qlora") / "run"
  summary = run(TrainConfig(output_dir=str(out), quantize="nf4", **QUICK))
  return out, summary


def _rel_err(got, want) -> float:
  return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def test_quantize_nf4_trains_and_reloads_on_the_dense_base(qlora_run):
  out, summary = qlora_run
  losses = [json.loads(l)["loss"] for l in open(out / "metrics.jsonl")]
  assert losses[-1] < losses[0] and summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
  q = summary["base_quantization"]
  assert (q["source"], q["quant_type"], q["blocksize"], q["double_quant"]) == ("--quantize", "nf4", 64, True)
  assert len(q["kernels"]) == 7 and 4.12 < q["bits_per_parameter"] < 4.13
  assert jlora.read_adapter_metadata(str(out / "adapter"))["base_quantization"] == q
  dense = model_lib.load(DEFAULT_MODEL)
  # The stored base is 4-bit: embeddings and lm_head (float32) dominate this tiny model's bytes.
  assert summary["base_model_bytes"] < 0.7 * model_lib.base_bytes(dense.params)
  # Checkpoints are adapter-only and carry the unquantized base's fingerprint: they load onto it.
  assert jlora.read_adapter_metadata(str(out / "adapter"))["base_fingerprint"] == jlora.fingerprint(dense.params)
  lp = jlora.load_adapter(str(out / "adapter"), dense.params)
  assert not any(isinstance(x, jlora.NF4Weight) for x in jax.tree.leaves(
      lp, is_leaf=lambda x: isinstance(x, jlora.NF4Weight)))
  # ... and onto the 4-bit base (the same fingerprint), with the same factors.
  qbase, _ = quantize_base(TrainConfig(quantize="nf4"), dense.params, dense.layout, None, model_id="tiny")
  lq = jlora.load_adapter(str(out / "adapter"), qbase)
  assert isinstance(lq["layers"]["mlp"]["up_proj"]["kernel"].w0, jlora.NF4Weight)
  jax.tree.map(np.testing.assert_array_equal, jlora.split(lq)[0], jlora.split(lp)[0])


def test_peft_export_loads_onto_the_bitsandbytes_base(qlora_run, bnb_base):
  out, summary = qlora_run
  qm, d = bnb_base
  pm = peft.PeftModel.from_pretrained(qm, summary["peft_dir"]).eval()
  assert isinstance(pm.base_model.model.model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
  with torch.no_grad():
    got = pm(torch.tensor(IDS)).logits.numpy()
    with pm.disable_adapter():
      base = pm(torch.tensor(IDS)).logits.numpy()
  # jlora on the very bytes bitsandbytes holds (jlora.models.load of its *-bnb-4bit directory), with the
  # adapter the run saved: the same float32 weights and adapters on both sides, so only summation
  # order differs (~1e-6 of the logits' scale; a wrong scale, transposition or layer is > 1e-2).
  model, qparams = jlora.models.load(d)
  lp = jlora.load_adapter(str(out / "adapter"), qparams)  # the same fingerprint as the dense base
  want = np.asarray(jax.jit(jlora.wrap(model))(lp, jnp.asarray(IDS)))
  assert _rel_err(got, want) < 1e-5
  assert _rel_err(base, want) > 1e-3  # the adapter matters


def test_a_bnb_4bit_model_trains_as_it_is(bnb_base, tmp_path):
  qm, d = bnb_base
  summary = run(TrainConfig(model=d, output_dir=str(tmp_path / "out"), **{**QUICK, "steps": 3,
                                                                           "eval_exact_match": -1}))
  q = summary["base_quantization"]
  assert (q["source"], q["quant_type"], q["double_quant"]) == ("checkpoint", "nf4", True)
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
  # Fingerprint semantics: the checkpoint's NF4 codes are those of the unquantized base it came
  # from, so the adapter loads onto that dense base too.
  dense = model_lib.load(DEFAULT_MODEL).params
  jlora.load_adapter(str(tmp_path / "out" / "adapter"), dense)
  # --quantize in another format than the checkpoint's: one clear error.
  loaded = model_lib.load(d)
  with pytest.raises(UserError, match=r"--quantize fp4: --model bnb is already quantized \(nf4, blocksize 64, "
                                      r"double_quant true\) and trains in 4 bits as it is; drop --quantize"):
    quantize_base(TrainConfig(quantize="fp4"), loaded.params, loaded.layout, None, model_id="bnb")


def test_user_errors():
  with pytest.raises(UserError, match=r"--quantize nf4: tiny has no linear kernels to quantize"):
    quantize_base(TrainConfig(quantize="nf4"), {"lm_head": {"kernel": jnp.ones((4, 4))}},
                  {"lm_head/kernel": jlora.KernelLayout(in_axes=(0,))}, None, model_id="tiny")
  res = finetune("--quantize", "nf4", "--quant-blocksize", "48")
  assert_user_error(res, "jlora-finetune", "--quant-blocksize must be a power of two in 32..4096, got 48")
