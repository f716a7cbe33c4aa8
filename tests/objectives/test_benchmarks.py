"""The objectives' benchmarks run: ``python benchmarks/<name>.py --smoke --out FILE`` (tiny shapes).

All three (chunked_logits, dpo_step, grpo_step) run in one subprocess (one JAX start-up) whose XLA compiles fast: a smoke run's programs
are tiny and many, so compile time is nearly all of it (26 s in this process, 6 s so). Their
numbers are only checked for what holds at any size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import command_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# helpers.command_env's -O0 code generation, plus no fusion emitters and one code-generation thread.
FAST_XLA = ("--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1")
NAMES = ("chunked_logits", "dpo_step", "grpo_step")  # benchmarks/chunked_logits.py, benchmarks/dpo_step.py,
# benchmarks/grpo_step.py
RUN = """
import runpy, sys
for script, out in {runs!r}:
  sys.argv = [script, "--smoke", "--out", out]
  sys.path.insert(0, "benchmarks")
  runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  d = tmp_path_factory.mktemp("bench")
  runs = [(f"benchmarks/{name}.py", str(d / f"{name}.json")) for name in NAMES]
  env = command_env()
  env["XLA_FLAGS"] = " ".join([*env["XLA_FLAGS"].split(), *FAST_XLA])
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
  proc = subprocess.run([sys.executable, "-c", RUN.format(runs=runs)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return {name: json.loads((d / f"{name}.json").read_text()) for name in NAMES}


def test_chunked_logits_smoke(results):
  for r in results["chunked_logits"]["vocab"].values():
    assert r["ratios"]["chunked/full flops"] == pytest.approx(1.0, abs=0.02)
    assert set(r) >= {"full", "chunked", "trunk", "reference_sizes"}


def test_dpo_step_smoke(results):
  r = results["dpo_step"]
  assert r["one_copy_of_the_base"]
  assert r["ratios"]["dpo/sft arguments"] == 1.0
  assert r["steps"]["dpo"]["flops"] > r["steps"]["sft"]["flops"]  # the reference pass is there


def test_grpo_step_smoke(results):
  r = results["grpo_step"]
  assert r["one_copy_of_the_base"] and r["same_samples_unmerged_and_merged"]
  mem = r["memory"]
  assert mem["train_step"]["base_copies_in_arguments"] == pytest.approx(1.0, abs=0.02)
  assert mem["rollout_unmerged"]["argument_bytes"] < mem["base_bytes"] + mem["rollout_merged"]["merged_copy_bytes"]
  for k in ("rollout_unmerged_tokens_per_s", "rollout_trl_way_tokens_per_s", "train_tokens_per_s"):
    assert r["wall"][k] > 0
