"""--report-to: the logged metrics in TensorBoard event files and a Weights & Biases run (offline)."""

from __future__ import annotations

import glob
import json

import pytest

from jlora.finetune import TrainConfig, run


def test_tensorboard_and_wandb_get_what_metrics_jsonl_gets(tmp_path, small_eval, monkeypatch):
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  out = tmp_path / "run"
  run(TrainConfig(output_dir=str(out), eval_data=small_eval, steps=4, batch_size=4, max_seq_len=32, rank=2,
                  log_every=2, eval_every=2, eval_exact_match=-1, progress=False, report_to="tensorboard,wandb"))
  logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [e["step"] for e in logged] == [2, 4] and all("eval_loss" in e for e in logged)

  acc = event_accumulator.EventAccumulator(str(out / "tensorboard"))
  acc.Reload()
  for name in ("loss", "grad_norm", "eval_loss", "tokens_per_s"):
    scalars = acc.Scalars(name)
    assert [s.step for s in scalars] == [2, 4]
    assert [s.value for s in scalars] == pytest.approx([e[name] for e in logged], rel=1e-6)  # float32 events

  # The offline W&B run holds each logged value (its history records carry the values as JSON).
  (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
  records = open(run_file, "rb").read()
  assert (out / "wandb-run-id").read_text() in run_file
  for e in logged:
    for name in ("loss", "eval_loss", "grad_norm"):
      assert json.dumps(e[name]).encode() in records, (name, e[name])
