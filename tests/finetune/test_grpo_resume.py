"""--task grpo as a user runs it (subprocesses): a kill -9 anywhere resumes identically (the rollout batch kept
over --num-iterations steps and the rollout keys included), SIGTERM checkpoints, and one step on 8 fake devices
equals one device's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import command_env

import jlora
from jlora.finetune.metrics import MetricsLog
from jlora.finetune.options import ASSETS

QUICK = ["--task", "grpo", "--batch-size", "8", "--num-generations", "4", "--max-completion-length", "8",
         "--rank", "2", "--lr", "1e-2", "--warmup-steps", "0", "--eval-every", "1000", "--log-every", "1",
         "--save-every", "3", "--eval-exact-match", "-1", "--no-progress", "--num-iterations", "2", "--beta", "0.04",
         "--reward", "exact_match", "--reward", "length:4:0.5", "--temperature", "1.2", "--top-k", "50"]
STEPS = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("prompts")
  with open(f"{ASSETS}/data/reverse_words.train.jsonl") as f:
    lines = f.readlines()
  (d / "train.jsonl").write_text("".join(lines[:48]))
  (d / "eval.jsonl").write_text("".join(lines[48:56]))
  return ["--data", str(d / "train.jsonl"), "--eval-data", str(d / "eval.jsonl")]


def _cmd(out, data, steps=STEPS, *extra):
  return [sys.executable, "-m", "jlora.finetune", "--output-dir", str(out), "--steps", str(steps), *QUICK, *data,
          *extra]


def _adapter(path):
  lp = jlora.load_adapter(str(path), jlora.models.load(jlora.models.TINY_BASE)[1])
  return {p: (np.asarray(w.a), np.asarray(w.b)) for p, w in jlora._checkpoint.adapter_weights(lp).items()}


def _assert_same_adapter(a, b, rtol=1e-5, atol=1e-6):
  x, y = _adapter(a), _adapter(b)
  assert x.keys() == y.keys()
  for k in x:
    for u, v in zip(x[k], y[k]):
      np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)


def _logged(out):
  return {e["step"]: e for e in MetricsLog(str(out / "metrics.jsonl")).read()}


def _wait_for_checkpoint(out, proc, min_step, timeout=300):
  ck = out / "checkpoints"
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      pytest.fail(f"run ended (rc={proc.returncode}) before checkpoint {min_step}:\n" + proc.stdout.read().decode()[-3000:])
    if ck.exists():
      steps = [int(d.name) for d in ck.iterdir() if d.name.isdigit() and (d / "commit_success.txt").exists()]
      if steps and max(steps) >= min_step:
        return max(steps)
    time.sleep(0.02)
  pytest.fail("no checkpoint appeared")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
  out = tmp_path_factory.mktemp("uninterrupted")
  res = subprocess.run(_cmd(out, data), capture_output=True, text=True, env=command_env())
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  return out


def _resume_matches(reference, out, data, seen):
  res = subprocess.run(_cmd(out, data), capture_output=True, text=True, env=command_env())
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  assert f"resumed from {out / 'checkpoints'}/{seen}" in res.stdout
  _assert_same_adapter(out / "adapter", reference / "adapter")
  ours, theirs = _logged(out), _logged(reference)
  assert sorted(ours) == list(range(1, STEPS + 1))
  for step in range(seen + 1, STEPS + 1):  # the same rollouts (rewards, lengths) and losses after the resume
    for k in ("reward", "completions/mean_length", "loss", "kl"):
      if k in theirs[step]:
        assert ours[step][k] == pytest.approx(theirs[step][k], rel=1e-5, abs=1e-6), (step, k)


def test_kill_9_resumes_identically(reference, data, tmp_path):
  out = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(out, data), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=command_env())
  seen = _wait_for_checkpoint(out, proc, 3)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL and not (out / "adapter").exists(), "the run finished before the kill"
  # Checkpoint 3 holds the rollout of steps 2 and 3 (--num-iterations 2): step 3 trains on it again.
  _resume_matches(reference, out, data, seen)


@pytest.mark.slow  # resuming is covered by the kill -9 test; this adds the signal's checkpoint
def test_sigterm_checkpoints_then_resumes(reference, data, tmp_path):
  out = tmp_path / "preempted"
  proc = subprocess.Popen(_cmd(out, data), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=command_env())
  _wait_for_checkpoint(out, proc, 3)
  proc.send_signal(signal.SIGTERM)
  stdout = proc.communicate(timeout=300)[0].decode()
  assert proc.returncode == 143, stdout[-3000:]
  stopped = int(stdout.split("SIGTERM: saved checkpoint at step ")[1].split(";")[0])
  _resume_matches(reference, out, data, stopped)


def test_one_step_on_8_devices_equals_one_devices(data, tmp_path):
  runs = {}
  for devices in (1, 8):
    out = tmp_path / f"d{devices}"
    res = subprocess.run(_cmd(out, data, 1), capture_output=True, text=True, env=command_env(devices))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs[devices] = out
  _assert_same_adapter(runs[8] / "adapter", runs[1] / "adapter", rtol=1e-4, atol=1e-6)
  one, eight = _logged(runs[1])[1], _logged(runs[8])[1]
  for k in ("reward", "completions/mean_length", "loss", "grad_norm", "kl"):
    assert eight[k] == pytest.approx(one[k], rel=1e-4, abs=1e-6), k
  summary = json.loads((runs[8] / "summary.json").read_text())
  assert summary["after"]["eval_reward"] == pytest.approx(json.loads((runs[1] / "summary.json").read_text())[
      "after"]["eval_reward"])
