"""A rerun into a run's directory continues it only with the same data and optimisation options."""

from __future__ import annotations

import shutil

from cli_runs import assert_user_error, finetune

from jlora.finetune.config import DEFAULT_DATA

RUN = ["--steps", "4", "--save-every", "2", "--batch-size", "4", "--max-seq-len", "32", "--rank", "2",
       "--eval-every", "1000", "--eval-exact-match", "-1", "--no-progress"]


def test_other_data_or_options_are_refused_and_logging_may_change(tmp_path, small_eval):
  data = tmp_path / "upper.jsonl"
  with open(DEFAULT_DATA) as f:
    lines = f.readlines()[:64]
  data.write_text("".join(lines))
  other = tmp_path / "add.jsonl"
  other.write_text("".join(lines[:48]))
  out = tmp_path / "run"
  first = finetune("--output-dir", str(out), "--data", str(data), "--eval-data", small_eval, *RUN, "--steps", "2")
  assert first.returncode == 0, first.stderr[-3000:]
  ckpt = out / "checkpoints" / "2"

  # The case: other data and another length into the same --output-dir.
  res = finetune("--output-dir", str(out), "--data", str(other), "--eval-data", small_eval, *RUN, "--steps", "8")
  line = assert_user_error(res, "jlora-finetune", f"{ckpt} was written by a run with other data or optimisation "
                           "options", f"--data {str(data)!r} (now {str(other)!r})", "--steps 2 (now 8)",
                           "--overwrite", "--output-dir")
  assert "resumed" not in res.stdout, line
  res = finetune("--output-dir", str(out), "--data", str(data), "--eval-data", small_eval, *RUN, "--steps", "2",
                 "--lr", "1e-3")
  assert_user_error(res, "jlora-finetune", "--lr 0.004 (now 0.001)")

  # The same path with other contents: the tokens the loss sees differ.
  edited = tmp_path / "edited"
  shutil.copytree(out, edited)
  data.write_text("".join(lines[1:]))
  res = finetune("--output-dir", str(edited), "--data", str(data), "--eval-data", small_eval, *RUN, "--steps", "2")
  assert_user_error(res, "jlora-finetune", "was trained on other data than --data now holds", "--overwrite")
  data.write_text("".join(lines))

  # Logging, evaluation and checkpointing options do not change the result: the run continues.
  res = finetune("--output-dir", str(out), "--data", str(data), "--eval-data", small_eval, *RUN, "--steps", "2",
                 "--log-every", "7", "--save-every", "5", "--keep-checkpoints", "3")
  assert res.returncode == 0, res.stderr[-3000:]
  assert f"resumed from {out / 'checkpoints'}/2 (step 2 of 2)" in res.stdout
