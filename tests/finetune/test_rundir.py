"""A rerun never wastes a run: --no-resume into an earlier run is refused at start, --overwrite starts fresh."""

from __future__ import annotations

import json
import shutil

from cli_runs import SHORT, assert_user_error, finetune

from jlora.finetune import rundir


def _snapshot(out):
  return {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_no_resume_into_a_run_is_refused_at_start(short_run, tmp_path, small_eval):
  out = tmp_path / "run"
  shutil.copytree(short_run, out)
  before = _snapshot(out)
  res = finetune("--output-dir", str(out), "--eval-data", small_eval, "--no-resume", *SHORT)
  line = assert_user_error(res, "jlora-finetune", str(out), "already holds checkpoints", "step 4",
                           "new --output-dir", "--overwrite")
  assert "training" not in res.stdout and _snapshot(out) == before, line  # nothing ran, nothing changed


def test_overwrite_starts_fresh_and_keeps_other_files(short_run, tmp_path, small_eval):
  out = tmp_path / "run"
  shutil.copytree(short_run, out)
  (out / "notes.txt").write_text("mine")
  (out / rundir.CHECKPOINTS / "2").rename(out / rundir.CHECKPOINTS / "6")  # a checkpoint this run never writes
  res = finetune("--output-dir", str(out), "--eval-data", small_eval, "--overwrite", *SHORT)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  assert "--overwrite: deleted the earlier run's checkpoints" in res.stdout and "resumed" not in res.stdout
  assert (out / "notes.txt").read_text() == "mine"
  assert rundir.checkpoint_steps(str(out)) == [4, 2]  # the stale step 6 is gone with the old run
  steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4]  # logged once, by this run


def test_clear_deletes_only_what_a_run_writes(tmp_path):
  for name in ("checkpoints/2", "adapter", "peft"):
    (tmp_path / name).mkdir(parents=True)
  for name in ("metrics.jsonl", "summary.json", "baseline.json", "my_data.jsonl"):
    (tmp_path / name).write_text("{}")
  assert sorted(rundir.clear(str(tmp_path))) == sorted(
      ["checkpoints", "adapter", "peft", "metrics.jsonl", "summary.json", "baseline.json"])
  assert [p.name for p in tmp_path.iterdir()] == ["my_data.jsonl"]


def test_a_failure_before_training_removes_the_directory_it_created(tmp_path, monkeypatch, small_eval):
  """Even a failure after the directory was created (here: a bug in the baseline eval)."""
  import pytest

  from jlora.finetune import TrainConfig, run
  from jlora.finetune.tasks import SFT

  out = [tmp_path / "run"]

  def broken_eval(self, params):
    assert out[0].is_dir()  # the run had created its directory
    raise RuntimeError("a bug in the eval")

  monkeypatch.setattr(SFT, "evaluate", broken_eval)
  cfg = TrainConfig(output_dir=str(tmp_path / "run"), eval_data=small_eval, steps=2, batch_size=4, max_seq_len=32,
                    eval_exact_match=-1, progress=False, reproducible=False)
  with pytest.raises(RuntimeError, match="a bug in the eval"):  # bugs are not user errors: they propagate
    run(cfg)
  assert not (tmp_path / "run").exists()
  out[0] = tmp_path / "kept"
  out[0].mkdir()  # a directory the user made is never removed
  with pytest.raises(RuntimeError, match="a bug in the eval"):
    run(TrainConfig(**{**cfg.to_dict(), "output_dir": str(tmp_path / "kept")}))
  assert (tmp_path / "kept").is_dir()
