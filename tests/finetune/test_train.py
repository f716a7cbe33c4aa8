"""End-to-end fine-tuning runs: resume after SIGKILL / SIGTERM, base checks, HF model dirs."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import command_env

import jlora
from jlora.finetune import model as model_lib
from jlora.finetune.config import DEFAULT_MODEL

QUICK = ["--batch-size", "4", "--max-seq-len", "32", "--eval-every", "1000", "--log-every", "1",
         "--save-every", "4", "--eval-exact-match", "-1", "--no-progress", "--lora-dropout", "0.1",
         "--rank", "4", "--grad-accum", "2"]


def _cmd(out, steps):
  return [sys.executable, "-m", "jlora.finetune", "--output-dir", str(out), "--steps", str(steps), *QUICK]


def _adapter_arrays(path):
  base = model_lib.load(DEFAULT_MODEL).params
  lp = jlora.load_adapter(str(path), base)
  return {p: (np.asarray(w.a), np.asarray(w.b)) for p, w in jlora._checkpoint.adapter_weights(lp).items()}


def _assert_same_adapter(a, b):
  x, y = _adapter_arrays(a), _adapter_arrays(b)
  assert x.keys() == y.keys()
  for k in x:
    for u, v in zip(x[k], y[k]):
      # Same data order, same rng, same compiled step: equal up to float rounding.
      np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def _wait_for_checkpoint(out, proc, min_step, timeout=240):
  ck = out / "checkpoints"
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      pytest.fail(f"run ended (rc={proc.returncode}) before a checkpoint >= {min_step} appeared:\n"
                  + proc.stdout.read().decode()[-3000:])
    if ck.exists():
      steps = [int(d.name) for d in ck.iterdir() if d.name.isdigit() and (d / "commit_success.txt").exists()]
      if steps and max(steps) >= min_step:
        return max(steps)
    time.sleep(0.02)
  pytest.fail("no checkpoint appeared")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  out = tmp_path_factory.mktemp("uninterrupted")
  subprocess.run(_cmd(out, 40), check=True, capture_output=True, env=command_env())
  return out


def test_resume_after_sigkill_matches_uninterrupted_run(reference, tmp_path):
  out = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(out, 40), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=command_env())
  seen = _wait_for_checkpoint(out, proc, 8)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert seen < 40 and not (out / "adapter").exists(), "the run finished before it was killed"
  res = subprocess.run(_cmd(out, 40), capture_output=True, text=True, env=command_env())
  assert res.returncode == 0, res.stdout + res.stderr
  assert "resumed from" in res.stdout
  _assert_same_adapter(out / "adapter", reference / "adapter")
  # The metrics log has each step once even though steps after the checkpoint ran twice.
  steps = [e["step"] for e in jlora.finetune.metrics.MetricsLog(str(out / "metrics.jsonl")).read()]
  assert steps == sorted(set(steps)) and steps[-1] == 40


@pytest.mark.slow  # resume itself is covered by the SIGKILL test
def test_sigterm_checkpoints_then_resumes(reference, tmp_path):
  out = tmp_path / "preempted"
  proc = subprocess.Popen(_cmd(out, 40), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=command_env())
  _wait_for_checkpoint(out, proc, 4)
  proc.send_signal(signal.SIGTERM)
  stdout = proc.communicate(timeout=120)[0].decode()
  assert proc.returncode == 143, stdout[-3000:]
  assert "SIGTERM: saved checkpoint at step" in stdout
  stopped = int(stdout.split("SIGTERM: saved checkpoint at step ")[1].split(";")[0])
  assert (out / "checkpoints" / str(stopped) / "commit_success.txt").exists()
  res = subprocess.run(_cmd(out, 40), capture_output=True, text=True, env=command_env())
  assert res.returncode == 0, res.stdout + res.stderr
  assert f"resumed from {out / 'checkpoints'}/{stopped}" in res.stdout
  _assert_same_adapter(out / "adapter", reference / "adapter")


def test_checkpoint_metadata_and_other_base_is_refused(reference, tmp_path):
  meta = jlora.read_adapter_metadata(str(reference / "adapter"))
  assert meta["base_model"] == "jlora/tiny-base (bundled)"
  assert meta["lora_config"]["rank"] == 4 and meta["train_config"]["steps"] == 40
  some = next(iter(meta["adapters"].values()))
  assert some["rank"] == 4 and some["scale"] == 4.0 and some["rslora"] is False
  base = model_lib.load(DEFAULT_MODEL).params
  other = jax.tree.map(lambda x: x * 1.01, base)
  with pytest.raises(jlora.AdapterMismatchError, match=r"trained on base model 'jlora/tiny-base \(bundled\)'"):
    jlora.load_adapter(str(reference / "adapter"), other)
  # A training run on a different base refuses the checkpoints in its output dir.
  moved = tmp_path / "run"
  shutil.copytree(reference, moved)
  shutil.rmtree(moved / "adapter")
  other_dir = tmp_path / "other-base"
  shutil.copytree(DEFAULT_MODEL, other_dir)
  loaded = model_lib.load(str(other_dir))
  model_lib.save_pretrained(loaded, str(other_dir), jax.tree.map(lambda x: x * 1.01, loaded.params))
  res = subprocess.run([*_cmd(moved, 44), "--model", str(other_dir)], capture_output=True, text=True,
                       env=command_env())
  assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
  assert res.stderr.startswith("jlora-finetune: error: checkpoint ") and "fingerprint" in res.stderr
  assert "--model this run was started with" in res.stderr and "--overwrite" in res.stderr
