"""``benchmarks/moe_dispatch.py --smoke`` runs (tiny shapes, one round) and reports what it exists to report."""

from __future__ import annotations

from smoke_runs import finite, load_result, results_snapshot, run_group, smoke_env


def test_moe_dispatch_benchmark_smoke(tmp_path):
  before = results_snapshot()
  out = tmp_path / "moe_dispatch.json"
  run = run_group([["benchmarks/moe_dispatch.py", "--smoke", "--out", str(out)]], env=smoke_env())
  run.ok("benchmarks/moe_dispatch.py")
  assert results_snapshot() == before, "a --smoke run changed benchmarks/results/"
  result = load_result(out)
  assert result["auto_picks"] in ("ragged", "dense")
  for name in ("qwen3_moe", "mixtral"):
    r = result["dispatch"][name]
    for dispatch in ("ragged", "dense"):
      for key in ("forward_flops", "lora_step_flops", "forward_s", "lora_step_s"):
        finite(r[dispatch][key])
    assert r["ragged"]["forward_flops"] > r["dense"]["forward_flops"]  # XLA:CPU's masked ragged_dot
    assert r["logits_max_rel_diff"] < 1e-4
  for depth in (1, 2):
    finite(result["compile_time"][f"layers_{depth}"]["lora_step_total_s"])
  finite(result["compile_time"]["lora_step_2_over_1"])
