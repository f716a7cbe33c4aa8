"""What a run checks before its first step: memory, data lengths, and what it prints while it trains."""

from __future__ import annotations

import json

import pytest
from cli_runs import finetune

from jlora.finetune import TrainConfig, UserError, memory_check, run
from jlora.finetune.config import DEFAULT_DATA

SHORT = dict(steps=2, batch_size=8, max_seq_len=32, rank=2, eval_exact_match=-1, progress=False)


def test_a_step_that_cannot_fit_is_refused_before_training_with_options_that_fit(tmp_path, small_eval, monkeypatch):
  free = {}

  def available():  # what the device has free: a quarter of what this step needs
    return free["bytes"]

  real = memory_check.compile_and_check

  def check(step, args, **kw):
    compiled = step.lower(*args).compile()
    free["bytes"] = memory_check.step_bytes(compiled) // 4
    return real(step, args, **kw, available=available)

  monkeypatch.setattr(memory_check, "compile_and_check", check)
  out = tmp_path / "run"
  with pytest.raises(UserError, match=r"the train step needs about .* GiB per device beyond the weights .* but "
                                      r"only .* GiB are free; use --batch-size (\d+) --grad-accum (\d+) \(about the "
                                      r"same 8 sequences per step.*\), or --remat or a shorter --max-seq-len") as e:
    run(TrainConfig(output_dir=str(out), eval_data=small_eval, **SHORT))
  assert not out.exists()  # nothing written, no baseline evaluated
  import re

  rows, accum = map(int, re.search(r"--batch-size (\d+) --grad-accum (\d+)", str(e.value)).groups())
  assert 1 <= rows < 8 and rows * accum >= 8
  # What it proposes fits in the same memory.
  monkeypatch.setattr(memory_check, "compile_and_check",
                      lambda step, args, **kw: real(step, args, **kw, available=lambda: free["bytes"]))
  summary = run(TrainConfig(output_dir=str(out), eval_data=small_eval, **{**SHORT, "batch_size": rows,
                                                                          "grad_accum": accum}))
  assert summary["steps"] == 2


def test_long_eval_examples_are_reported_and_logs_print_without_a_progress_bar(tmp_path):
  eval_path = tmp_path / "eval.jsonl"
  long_prompt = "Reverse the words: " + " ".join(["word"] * 60) + "\nAnswer:"
  eval_path.write_text(json.dumps({"prompt": long_prompt, "completion": " a b c"}) + "\n"
                       + json.dumps({"prompt": "Reverse the words: a b c\nAnswer:", "completion": " c b a"}) + "\n")
  data = tmp_path / "small.jsonl"
  with open(DEFAULT_DATA) as f:
    data.write_text("".join(f.readlines()[:40]))
  res = finetune("--output-dir", str(tmp_path / "run"), "--data", str(data), "--eval-data", str(eval_path),
                 "--batch-size", "4", "--max-seq-len", "32", "--rank", "2", "--epochs", "1", "--log-every", "5",
                 "--max-new-tokens", "4", "--no-progress")
  assert res.returncode == 0, res.stderr[-3000:]
  out = res.stdout
  assert "data: 1 of 2 eval examples truncated to max_seq_len=32" in out, out
  # 10 steps at --epochs 1: a small data set gets the hint; the log lines appear without a bar.
  assert "data: 10 optimizer steps (1 epochs of 10 steps at batch 4); small data sets usually need more passes" \
      in out, out
  assert "step 5/10: loss " in out and "step 10/10: loss " in out and "eval_loss " in out, out
