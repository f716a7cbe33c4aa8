"""Every benchmark runs in its ``--smoke`` mode (tiny shapes, one round): a refactor cannot break one unseen.

This file: the train-step family (train_step, dora_step, qlora, compile_time), forward and
collectives; tests/test_benchmarks_smoke_more.py: the others. Each file runs its benchmarks in
one process (tests/smoke_runs.py: ``python benchmarks/X.py --smoke`` each, start-up shared),
except collectives, which needs a process of its own (8 fake devices) and runs as a user runs it.
The assertions check what a benchmark exists to report: the numbers are there, finite and of
the right sign; at these shapes they mean nothing else.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from smoke_runs import (HAVE_QWIX, HAVE_TORCH, REPO, finite, load_result, printed_json, results_snapshot, run_group,
                        smoke_env)


@pytest.fixture(scope="module")
def group(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  before = results_snapshot()
  steps = [["benchmarks/train_step.py", "--smoke", "--out", str(out / "train_step.json")],
           ["benchmarks/dora_step.py", "--smoke", "--out", str(out / "dora_step.json")],
           ["benchmarks/qlora.py", "--smoke", "--out", str(out / "qlora.json")],
           ["benchmarks/compile_time.py", "--smoke", "--models", "unrolled,scanned,moe", "--out",
            str(out / "compile_time.json")],
           ["benchmarks/forward.py", "--smoke"]]  # no --out: prints its result, writes no file
  run = run_group(steps, env=smoke_env(torch=True))
  print(f"benchmarks smoke group: {run.summary()}")
  assert results_snapshot() == before, "a --smoke run changed benchmarks/results/"
  run.out = out
  return run


def test_train_step(group):
  run = group.ok("benchmarks/train_step.py")
  shape = load_result(group.out / "train_step.json")["shapes"]["mha_t256"]
  assert shape["config"]["hidden_size"] == 32 and shape["config"]["batch"] == 2
  xla = shape["xla"]
  for name in ("floor", "full", "jlora", "jlora_autodiff"):
    finite(xla[name]["flops"])
    finite(xla[name]["peak_bytes"])
  finite(xla["jlora"]["flops_over_floor"])
  finite(xla["jlora"]["temp_over_full"])
  wall = shape["wall"]
  assert wall["rounds"] == 1
  for name in ("floor", "jlora", "full", "jlora_autodiff"):
    finite(wall[f"{name}_s"])
  finite(wall["jlora_over_floor"])
  if HAVE_TORCH:
    for name in ("torch_full", "peft_lora", "torch_floor"):
      finite(wall[f"{name}_s"])
    finite(wall["jlora_over_peft_lora"])
  if not HAVE_QWIX:
    assert "qwix not installed, its step skipped" in run.stdout and "qwix" not in xla
  else:
    finite(xla["qwix"]["flops"])


def test_dora_step(group):
  group.ok("benchmarks/dora_step.py")
  result = load_result(group.out / "dora_step.json")
  xla = result["xla"]
  assert xla["dora"]["flops"] > xla["lora"]["flops"] > 0  # DoRA's norm and magnitude come on top of LoRA
  finite(xla["dora_temp_over_lora"])
  finite(result["wall"]["jlora_dora_over_jlora_lora"])
  if HAVE_TORCH:
    finite(result["wall"]["peft_dora_over_peft_lora"])
    finite(result["wall"]["jlora_dora_over_peft_dora"])


def test_qlora(group):
  run = group.ok("benchmarks/qlora.py")
  anchor = load_result(group.out / "qlora.json")["anchor"]
  assert 4.0 < anchor["quantized_bits_per_param"] < 4.5  # NF4 + double-quantized absmax
  assert anchor["qlora"]["base_bytes"] < anchor["bf16_lora"]["base_bytes"]
  for name in ("bf16_lora", "qlora"):
    finite(anchor[name]["step_s"])
    finite(anchor[name]["peak_bytes"])
  if not HAVE_QWIX:
    assert "anchor: qwix not installed" in run.stdout


def test_compile_time(group):
  run = group.ok("benchmarks/compile_time.py")
  result = load_result(group.out / "compile_time.json")
  for kind, steps in (("unrolled", ("full", "jlora", "jlora_autodiff")), ("scanned", ("full", "jlora")),
                      ("moe", ("full", "jlora"))):
    best = result[kind]["1"]
    for step in steps:
      assert len(best["all_runs"][step]) == 1
      for part in ("trace_s", "lower_s", "compile_s", "total_s"):
        finite(best[step][part])
    finite(best["jlora_over_full"])
  assert all(f"{kind}, 1 layers: full" in run.stdout for kind in ("unrolled", "scanned", "moe"))


def test_forward_without_out_writes_nothing(group):
  run = group.ok("benchmarks/forward.py")
  assert "--smoke: wrote no result file (benchmarks/results/forward.json is left as it was)" in run.stdout
  result = printed_json(run.stdout)
  assert result["smoke"] is True and result["config"]["hidden_size"] == 32
  assert result["xla_flops_unmerged_over_base"] > 1  # the low-rank path adds FLOPs
  assert result["xla_flops_merged_over_base"] == 1  # merged weights: the base's own program
  finite(result["wall_unmerged_over_base"])


def test_collectives_as_a_user_runs_it(tmp_path):
  """Its own process: it asks for 8 fake CPU devices before JAX starts (keeping the other XLA flags)."""
  out = tmp_path / "collectives.json"
  res = subprocess.run([sys.executable, "benchmarks/collectives.py", "--smoke", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env=smoke_env())
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  assert f"wrote {out}" in res.stdout
  result = load_result(out)
  assert result["config"]["mesh"] == "fsdp=8" and len(result["machine"]["devices"]) == 8
  for kind in ("full_ft_bytes", "lora_bytes"):  # bytes per collective kind, in both steps
    assert result[kind]["all-gather"] > 0 and result[kind]["all-reduce"] + result[kind]["reduce-scatter"] > 0
  # (at d=32 the adapters are as large as the kernels' shards: lora_over_full_reduce is 0.005 only at d=512)
  finite(result["lora_over_full_reduce"])
  finite(result["lora_over_full_total"])


def test_reproducible_numerics_as_a_user_runs_it(tmp_path):
  """Its own process: it starts two workers, one pinned (numerics.pin() before JAX starts) and one not."""
  out = tmp_path / "reproducible_numerics.json"
  res = subprocess.run([sys.executable, "benchmarks/reproducible_numerics.py", "--smoke", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=smoke_env())
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  assert "pinned: --xla_cpu_max_isa=AVX2" in res.stderr  # the pinned worker says what it pinned
  result = load_result(out)
  assert set(result["seconds_per_step_median"]) == {"default", "pinned"}
  finite(result["pinned_over_default"])
