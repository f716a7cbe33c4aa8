"""``jlora-finetune --model <MoE directory>`` end to end, on tiny random transformers checkpoints.

One directory (Qwen2-MoE: 4 routed experts, top-2, a shared expert, 2 layers, hidden 64) is built once
and one 4-step run of it is shared: its merged export and PEFT export are checked against transformers
and PEFT, and its step-2 checkpoint is resumed on an 8-device mesh with an expert axis. The rest
(QLoRA on the experts, a real SIGKILL, other families) are slow duplicates.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_runs import finetune
from helpers import command_env

import jlora
import jlora.peft
from jlora._weight import is_lora_weight
from jlora.finetune import TrainConfig
from jlora.finetune import model as model_lib
from jlora.finetune.config import DEFAULT_DATA, DEFAULT_EVAL, DEFAULT_MODEL
from jlora.finetune.options import BatchOptions, DataOptions, EvalOptions, ObjectiveOptions, group
from jlora.finetune.tasks.base import TaskContext
from jlora.finetune import quantize as quantize_lib
from jlora.finetune.cli import OptionError, UserError
from jlora.finetune.tasks import sft as sft_lib
from jlora.finetune.tasks.sft import SFT

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
COMMON = dict(vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0)
MOE = {
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
                                         norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=32, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=8)),
}
IDS = np.array([[5, 17, 300, 42, 9, 77, 801, 3, 64, 11]])


def make_moe_dir(root, family: str) -> str:
  """A tiny random transformers checkpoint of ``family`` (safetensors) with the bundled tokenizer."""
  d = os.path.join(str(root), family)
  cls, extra = MOE[family]
  cfg = getattr(transformers, cls)(**{**COMMON, **extra})
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d, safe_serialization=True)
  for f in TOKENIZER_FILES:
    shutil.copy(os.path.join(DEFAULT_MODEL, f), os.path.join(d, f))
  return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("moe-data")
  for name, src, n in (("train.jsonl", DEFAULT_DATA, 64), ("eval.jsonl", DEFAULT_EVAL, 8)):
    with open(src) as f:
      (d / name).write_text("".join(f.readlines()[:n]))
  return str(d / "train.jsonl"), str(d / "eval.jsonl")


def args(model_dir, out, data, *extra, steps=4):
  return ["--model", model_dir, "--output-dir", str(out), "--data", data[0], "--eval-data", data[1],
          "--steps", str(steps), "--save-every", "2", "--batch-size", "4", "--max-seq-len", "32", "--rank", "2",
          "--log-every", "1", "--eval-every", "1000", "--eval-exact-match", "-1", "--no-progress", *extra]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
  return make_moe_dir(tmp_path_factory.mktemp("moe-model"), "qwen2_moe")


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, moe_dir, data):
  """A finished 4-step run (all-linear, --save-merged) with checkpoints at steps 2 and 4 (read-only)."""
  out = tmp_path_factory.mktemp("moe-run") / "run"
  res = finetune(*args(moe_dir, out, data, "--save-merged"))
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  return out, res.stdout


def _adapters(out, base_params):
  lp = jlora.load_adapter(str(out / "adapter"), base_params)
  return {p: (np.asarray(w.a), np.asarray(w.b)) for p, w in jlora._checkpoint.adapter_weights(lp).items()}


def test_the_run_adapts_routed_and_shared_experts_and_never_the_router(moe_run):
  out, stdout = moe_run
  count = next(l for l in stdout.splitlines() if l.startswith("model: "))
  assert "routed experts: 3 (" in count and "shared experts: 3 (" in count and "router" not in count, count
  assert "load-balancing" not in stdout  # no router trains: no auxiliary loss
  summary = json.loads((out / "summary.json").read_text())
  assert summary["steps"] == 4 and summary["after"]["eval_loss"] < summary["before"]["eval_loss"]


def test_merged_export_loads_in_transformers_and_peft_export_in_peft_with_logits_parity(moe_run, moe_dir):
  out, _ = moe_run
  _check_exports(out, moe_dir)
  cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
  assert any(".mlp.experts.3.down_proj" in m for m in cfg["target_modules"])
  assert not any(m.endswith((".mlp.gate", "shared_expert_gate")) for m in cfg["target_modules"])


def _check_exports(out, moe_dir):
  peft = pytest.importorskip("peft")
  loaded = model_lib.load(moe_dir)
  lp = jlora.load_adapter(str(out / "adapter"), loaded.params)
  ids = jnp.asarray(IDS)
  want = np.asarray(jax.jit(jlora.wrap(loaded.forward))(lp, ids, jnp.ones_like(ids)))
  with torch.no_grad():
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32)
    got_merged = merged(torch.tensor(IDS)).logits.numpy()
    base = transformers.AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    got_base = base(torch.tensor(IDS)).logits.numpy()
    got_peft = peft.PeftModel.from_pretrained(base, str(out / "peft"))(torch.tensor(IDS)).logits.numpy()
  delta = np.abs(want - got_base).max()
  assert delta > 1e-3  # the adapters changed the logits: the parity below is not the base's
  np.testing.assert_allclose(got_merged, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got_peft, want, atol=1e-5, rtol=1e-5)


def test_resume_on_an_expert_parallel_mesh_matches_the_uninterrupted_run(moe_run, moe_dir, data, tmp_path):
  """The run's state after step 2 (what a kill before step 4's checkpoint leaves), resumed on 8 devices
  with experts split over ``expert=4``: the same adapter as the uninterrupted single-device run."""
  done, _ = moe_run
  out = tmp_path / "run"
  shutil.copytree(done, out)
  shutil.rmtree(out / "checkpoints" / "4")
  for name in ("adapter", "peft", "merged", "summary.json"):
    p = out / name
    shutil.rmtree(p) if p.is_dir() else p.unlink()
  res = subprocess.run([sys.executable, "-m", "jlora.finetune",
                        *args(moe_dir, out, data, "--mesh", "data=2,expert=4", "--sharding", "fsdp")],
                       capture_output=True, text=True, env=command_env(devices=8), timeout=900)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  assert f"resumed from {out / 'checkpoints'}/2 (step 2 of 4)" in res.stdout
  base = model_lib.load(moe_dir).params
  got, want = _adapters(out, base), _adapters(done, base)
  assert got.keys() == want.keys() and any("experts" in p for p in got)
  for p in got:
    for u, v in zip(got[p], want[p]):
      np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6, err_msg=p)


def _sft(loaded, data, **options):
  cfg = TrainConfig(model=loaded.model_id, data=data[0], eval_data=data[1], max_seq_len=32, batch_size=2,
                    **options).resolved()
  task = SFT(group(cfg, DataOptions), group(cfg, BatchOptions), group(cfg, EvalOptions),
             group(cfg, ObjectiveOptions))
  lines = []
  task.prepare(TaskContext(loaded, say=lines.append))
  return task, lines


def test_a_trained_router_adds_the_load_balancing_loss_as_transformers(moe_dir, data, tmp_path):
  peft = pytest.importorskip("peft")
  loaded = model_lib.load(moe_dir)
  task, lines = _sft(loaded, data)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    regex = loaded.resolve_targets("shared_expert,router")
  assert [str(w.message).split(" (")[0] for w in caught] == [
      "targets 'shared_expert,router' adapt shared experts only"]
  lp = jlora.init(jax.random.key(0), loaded.params, jlora.LoraConfig(rank=2, alpha=4, targets=regex),
                  layout=loaded.layout)
  lp = jax.tree.map(lambda w: w.replace(b=0.3 * jax.random.normal(jax.random.key(1), w.b.shape))  # B != 0
                    if is_lora_weight(w) else w, lp, is_leaf=is_lora_weight)
  task.start(lp)
  assert task.aux_coef == 0.001 and lines[-1].startswith("loss: + 0.001 x load-balancing loss"), lines
  mb = {k: jnp.asarray(v)[0] for k, v in task.batch(0).items()}
  total, count, metrics = jax.jit(task.loss)(lp, mb, None)

  # transformers + PEFT on the same adapter: loss = CE + router_aux_loss_coef * aux_loss.
  jlora.peft.save(str(tmp_path / "peft"), lp, module_map=loaded.module_map, base_model_name_or_path=moe_dir)
  base = transformers.AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft"))
  ids, am, lm = (torch.tensor(np.asarray(mb[k]).astype(np.int64)) for k in ("ids", "attention_mask", "loss_mask"))
  with torch.no_grad():
    ref = model(input_ids=ids, attention_mask=am, labels=torch.where(lm.bool(), ids, -100),
                output_router_logits=True)
  np.testing.assert_allclose(float(metrics["aux_loss"]), float(ref.aux_loss), rtol=1e-5)
  np.testing.assert_allclose(float(total / count), float(ref.loss), rtol=1e-5)

  # Off when asked (0), off by default with no router trained, on when asked (> 0) with the routers frozen.
  assert sft_lib.router_aux_coef(0.0, loaded, lp) == (0.0, "")
  frozen_router = jlora.init(jax.random.key(0), loaded.params,
                             jlora.LoraConfig(rank=2, targets="layers/mlp/experts/.*"), layout=loaded.layout)
  assert sft_lib.router_aux_coef(None, loaded, frozen_router) == (0.0, "")
  assert sft_lib.router_aux_coef(0.01, loaded, frozen_router) == (
      0.01, "loss: + 0.01 x load-balancing loss of the routers (--router-aux-loss-coef)")


def test_router_aux_loss_coef_on_a_dense_model_or_another_task_is_an_error():
  dense = model_lib.load(DEFAULT_MODEL)
  with pytest.raises(UserError, match=r"--router-aux-loss-coef 0.01: .*tiny-base \(llama\) has no "
                                      r"mixture-of-experts layers; drop the option"):
    sft_lib.router_aux_coef(0.01, dense, dense.params)
  assert sft_lib.router_aux_coef(None, dense, dense.params) == (0.0, "")
  with pytest.raises(OptionError, match=r"router_aux_loss_coef.*applies to --task sft only; got --task dpo"):
    TrainConfig(task="dpo", router_aux_loss_coef=0.01)
  with pytest.raises(OptionError, match=r"router_aux_loss_coef.*must be >= 0"):
    TrainConfig(router_aux_loss_coef=-1.0)


@pytest.mark.slow  # (tests/experts/test_expert_ragged.py checks NF4 experts in the ragged_dot consumer, fast)
def test_qlora_experts_in_sorted_dispatch_equal_the_dense_dispatch_and_the_dequantized_base(moe_dir):
  """The command's QLoRA model (--quantize nf4: every linear kernel, the routed experts' [L, E, in, out]
  included, stored in 4 bits) in the sorted dispatch that TPU and GPU run (one ragged_dot per expert
  projection; the CPU runs the dense one): loss and adapter gradients equal the dense dispatch's and
  those of the dequantized float base."""
  loaded = model_lib.load(moe_dir)
  paths = quantize_lib.linear_kernels(loaded.layout)
  assert "layers/mlp/experts/gate_proj/kernel" in paths
  q = jlora.quantize(loaded.params, targets=[re.escape(p) for p in paths], blocksize=32, layout=loaded.layout)
  assert isinstance(q["layers"]["mlp"]["experts"]["down_proj"]["kernel"], jlora.NF4Weight)
  lp = jlora.init(jax.random.key(0), q, jlora.LoraConfig(rank=2, alpha=4, targets=loaded.resolve_targets(
      "all-linear")), layout=loaded.layout)
  lp = jax.tree.map(lambda w: w.replace(b=0.3 * jax.random.normal(jax.random.key(1), w.b.shape))
                    if is_lora_weight(w) else w, lp, is_leaf=is_lora_weight)
  adapters, frozen = jlora.split(lp)
  deq = jlora.combine(adapters, jlora.dequantize(frozen))
  ids = jnp.asarray(IDS)

  def loss(model, params):
    logits = jlora.wrap(lambda p: model(p, ids))(params)
    return -jnp.mean(jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))[0, jnp.arange(9), ids[0, 1:]])

  def value_and_grad(model, params):
    a, f = jlora.split(params)
    return jax.jit(jax.value_and_grad(lambda a: loss(model, jlora.combine(a, f))))(a)

  ragged = dataclasses.replace(loaded.model, moe_dispatch="ragged")
  dense = dataclasses.replace(loaded.model, moe_dispatch="dense")
  got, want, oracle = value_and_grad(ragged, lp), value_and_grad(dense, lp), value_and_grad(dense, deq)
  for other in (want, oracle):
    np.testing.assert_allclose(got[0], other[0], rtol=1e-5)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-3, atol=1e-6), got[1], other[1])


def test_the_gpt_oss_module_map_exports_its_experts_as_target_parameters():
  import jlora.models
  model = jlora.models.Decoder(jlora.models.ModelConfig.from_hf({
      "model_type": "gpt_oss", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 32, "head_dim": 16,
      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
      "num_experts_per_tok": 2}))
  mm = model.module_map
  assert mm.is_fused("layers/mlp/experts/gate_up_proj/kernel") and not mm.is_fused("layers/self_attn/q_proj/kernel")
  assert mm.to_module("layers/mlp/experts/gate_up_proj/kernel", (1,)) == "model.layers.1.mlp.experts.gate_up_proj"


# -- slow duplicates ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gpt_oss_run_exports_target_parameters_and_a_merged_checkpoint_with_logits_parity(data, tmp_path):
  """gpt-oss's experts are two 3-D parameters per layer: the PEFT export writes them as
  target_parameters (PEFT 0.21's layout for transformers 4.57, recorded), the merged one as the
  fused gate_up_proj / down_proj."""
  model_dir = make_moe_dir(tmp_path, "gpt_oss")
  out = tmp_path / "run"
  res = finetune(*args(model_dir, out, data, "--save-merged", steps=2))
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  assert "PEFT export: fused experts in PEFT 0.21's layout" in res.stdout and "export skipped" not in res.stdout
  cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
  assert "model.layers.1.mlp.experts.gate_up_proj" in cfg["target_parameters"]
  _check_exports(out, model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("family,targets", [("mixtral", "all-linear"), ("qwen3_moe", "q_proj,v_proj")])
def test_qlora_on_the_experts(family, targets, data, tmp_path):
  """--quantize nf4: the routed experts' [L, E, in, out] kernels stored in 4 bits, decoded in the
  consumer, adapted (all-linear) or frozen (q_proj,v_proj); the run trains."""
  model_dir = make_moe_dir(tmp_path, family)
  out = tmp_path / "run"
  res = finetune(*args(model_dir, out, data, "--quantize", "nf4", "--quant-blocksize", "32", "--targets", targets,
                       steps=4))
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  summary = json.loads((out / "summary.json").read_text())
  kernels = summary["base_quantization"]
  assert "layers/mlp/experts/gate_proj/kernel" in str(kernels) and "'quant_type': 'nf4'" in str(kernels)
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]


@pytest.mark.slow
def test_resume_after_sigkill_of_a_moe_run(moe_run, moe_dir, data, tmp_path):
  done, _ = moe_run
  out = tmp_path / "killed"
  cmd = [sys.executable, "-m", "jlora.finetune", *args(moe_dir, out, data, steps=4)]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=command_env())
  ck = out / "checkpoints" / "2" / "commit_success.txt"
  while not ck.exists():
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL and not (out / "adapter").exists(), "the run finished before the kill"
  res = finetune(*args(moe_dir, out, data, steps=4))
  assert res.returncode == 0 and "resumed from" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
  base = model_lib.load(moe_dir).params
  got, want = _adapters(out, base), _adapters(done, base)
  for p in got:
    for u, v in zip(got[p], want[p]):
      np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6, err_msg=p)


@pytest.mark.slow
def test_the_command_prints_the_shared_experts_only_line_and_trains_the_router_with_aux_loss(moe_dir, data,
                                                                                            tmp_path):
  res = finetune(*args(moe_dir, tmp_path / "run", data, "--targets", "shared_expert,router", steps=2))
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  notes = [l for l in res.stderr.splitlines() if "shared experts only" in l]
  assert len(notes) == 1 and notes[0].startswith("jlora-finetune: warning: targets 'shared_expert,router' adapt "
                                                 "shared experts only (3 kernels: "), res.stderr
  assert "loss: + 0.001 x load-balancing loss" in res.stdout and "aux_loss" in res.stdout
