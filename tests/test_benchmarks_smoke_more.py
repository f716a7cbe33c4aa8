"""The other half of the benchmarks' ``--smoke`` runs (see tests/test_benchmarks_smoke.py): jlora.models,
many adapters, bank strategies, the GPT-3 memory table and expert LoRA, in one process."""

from __future__ import annotations

import pytest
from smoke_runs import HAVE_TORCH, finite, load_result, results_snapshot, run_group, smoke_env


@pytest.fixture(scope="module")
def group(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  before = results_snapshot()
  steps = [[f"benchmarks/{name}.py", "--smoke", "--out", str(out / f"{name}.json")]
           for name in ("models", "many_adapters", "bank_strategies", "memory_gpt3", "expert_lora")]
  run = run_group(steps, env=smoke_env(torch=True))
  print(f"benchmarks smoke group: {run.summary()}")
  assert results_snapshot() == before, "a --smoke run changed benchmarks/results/"
  run.out = out
  return run


def test_models(group):
  run = group.ok("benchmarks/models.py")
  result = load_result(group.out / "models.json")
  assert result["config"]["hidden_size"] == 32 and result["trainable"] > 0
  mem = result["xla_memory_native"]
  assert 0 < mem["lora"]["temp_bytes"] and 0 < mem["full"]["temp_bytes"]
  finite(mem["lora_temp_over_full"])
  compile_time = result["compile_time"]
  for name in ("native", "flax"):
    for depth in (1, 2):
      finite(compile_time[f"{name}_{depth}"]["total_s"])
    finite(compile_time[f"{name}_2_over_1"])
  wall = result["lora_step_wall"]
  for name in ("native", "native_unrolled", "flax", *(("peft_torch",) if HAVE_TORCH else ())):
    finite(wall[f"{name}_tokens_per_s"])
  finite(wall["native_over_flax_speed"])
  assert "model: 0.0M params" in run.stdout


def test_many_adapters(group):
  """The script itself checks the mixed batch against each adapter merged and against PEFT's logits."""
  group.ok("benchmarks/many_adapters.py")
  result = load_result(group.out / "many_adapters.json")
  assert result["config"]["counts"] == [1, 4] and result["config"]["rows"] == 8
  names = ["merged", "single", "bank_1", "bank_4", "bank_4_gather", "bank_4_onehot"]
  if HAVE_TORCH:
    names += ["peft_mixed_4", "peft_single"]
    finite(result["forward_bank4_over_peft_mixed4"])
  for name in names:
    finite(result["forward_tokens_per_s"][name])
  for name in ("merged", "single", "bank_1", "bank_4"):
    finite(result["generate_tokens_per_s"][name])
    finite(result["generate_throughput_over_single"][name])
  for name in ("put_slot", "merge_into_base", "load_merged_from_disk"):
    finite(result["task_switch_ms"][name])
  flops = result["forward_xla_flops_over_single"]
  assert flops["single"] == 1 and flops["merged"] < 1  # merged: the base's FLOPs, no low-rank term


def test_bank_strategies(group):
  group.ok("benchmarks/bank_strategies.py")
  result = load_result(group.out / "bank_strategies.json")
  assert result["config"] == {"d_in": 32, "d_out": 32, "rank": 8, "batch": 4}
  kinds = [(r["tokens_per_row"], r["ids"], r["mode"]) for r in result["rows"]]
  assert kinds == [(1, "row", "forward"), (4, "row", "forward"), (4, "row", "grad"), (4, "token", "forward")]
  for row in result["rows"]:
    assert row["slots"] == 2
    finite(row["single_wall_s"])
    for strategy in ("gather", "onehot", "ragged"):
      finite(row[f"{strategy}_wall_over_single"])
      finite(row[f"{strategy}_flops_over_single"])


def test_memory_gpt3(group):
  run = group.ok("benchmarks/memory_gpt3.py")
  result = load_result(group.out / "memory_gpt3.json")
  reports = {r["method"]: r for r in result["reports"]}
  assert set(reports) == {"full", "lora", "dora", "qlora"}, result.get("skipped")
  total = {m: r["total"] for m, r in reports.items()}
  assert 0 < total["qlora"] < total["lora"] < total["full"]
  assert reports["lora"]["trainable_params"] < reports["full"]["trainable_params"]
  assert result["title"].startswith("gpt-tiny: batch 1x16")
  assert "total (XLA peak estimate)" in run.stdout  # the printed table
  assert (group.out / "memory_gpt3.png").stat().st_size > 0


def test_expert_lora(group):
  run = group.ok("benchmarks/expert_lora.py")
  result = load_result(group.out / "expert_lora.json")
  assert result["config"]["num_experts"] == 4 and "routed experts: 3" in result["count"]
  xla = result["xla"]
  for name in ("floor", "jlora", "jlora_autodiff", "jlora_experts_frozen", "full"):
    finite(xla[name]["flops"])
    assert xla[name]["temp_bytes"] > 0
  finite(xla["jlora"]["flops_over_floor"])
  finite(xla["jlora"]["temp_over_floor"])
  # No per-expert dW or B·A in the LoRA step's compiled program (no more expert-kernel-shaped buffers computed
  # than the floor's); full fine-tuning computes its dWs.
  buffers = {k: xla[k]["expert_kernel_shaped_buffers"]["computed"] for k in ("floor", "jlora", "full")}
  assert buffers["jlora"] == buffers["floor"] < buffers["full"], buffers
  wall = result["wall"]
  assert wall["rounds"] == 1
  for name in ("floor", "jlora", "jlora_experts_frozen"):
    finite(wall[f"{name}_s"])
  finite(wall["jlora_over_jlora_experts_frozen"])
  if HAVE_TORCH:
    finite(wall["jlora_over_peft_lora"])
    finite(wall["floor_over_torch_floor"])
  assert "expert LoRA: FLOPs" in run.stdout
