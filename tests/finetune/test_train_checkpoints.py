"""Resuming past corrupted checkpoints: skip what cannot be read, say so, fail clearly if nothing can."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from cli_runs import SHORT, assert_user_error, finetune

import jlora
from jlora.finetune import model as model_lib
from jlora.finetune import rundir
from jlora.finetune.checkpoint import COMMIT_MARKER
from jlora.finetune.config import DEFAULT_MODEL


def _truncate_arrays(step_dir):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files
  for p in files:
    with open(p, "r+b") as f:
      f.truncate(p.stat().st_size // 2)


def _corrupt_metadata(step_dir):
  (step_dir / "meta" / "metadata").write_text('{"format": "jlora-adapter/1", "adapters": {')


def _adapters(path):
  lp = jlora.load_adapter(str(path), model_lib.load(DEFAULT_MODEL).params)
  return {p: (np.asarray(w.a), np.asarray(w.b)) for p, w in jlora._checkpoint.adapter_weights(lp).items()}


@pytest.mark.parametrize("corrupt,reason", [(_truncate_arrays, "(array metadata: ValueError"),
                                            (_corrupt_metadata, "(metadata: JSONDecodeError")])
def test_resume_skips_an_unreadable_checkpoint(short_run, tmp_path, small_eval, corrupt, reason):
  out = tmp_path / "run"
  shutil.copytree(short_run, out)
  shutil.rmtree(out / "adapter")
  corrupt(out / "checkpoints" / "4")
  res = finetune("--output-dir", str(out), "--eval-data", small_eval, *SHORT)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  ckpts = out / "checkpoints"
  assert f"checkpoint {ckpts}/4 is unreadable {reason}" in res.stdout, res.stdout
  assert f"resumed from {ckpts}/2 (step 2 of 4)" in res.stdout
  assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr
  assert (out / rundir.UNREADABLE / "4").is_dir()  # kept for inspection, out of the way
  assert (ckpts / "4" / COMMIT_MARKER).exists()  # written again by the resumed run
  # Steps 3 and 4 ran again from step 2's state: the same adapter as the uninterrupted run.
  got, want = _adapters(out / "adapter"), _adapters(short_run / "adapter")
  assert got.keys() == want.keys()
  for k in got:
    for u, v in zip(got[k], want[k]):
      # Same data order, rng and compiled step; restored state is exact: equal up to float rounding.
      np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_no_readable_checkpoint_fails_naming_the_directory_and_the_fix(short_run, tmp_path, small_eval):
  out = tmp_path / "run"
  shutil.copytree(short_run, out)
  (out / "checkpoints" / "4" / COMMIT_MARKER).unlink()  # a save that never finished
  _truncate_arrays(out / "checkpoints" / "2")
  res = finetune("--output-dir", str(out), "--eval-data", small_eval, *SHORT)
  assert_user_error(res, "jlora-finetune", f"no readable checkpoint in {out / 'checkpoints'}",
                    f"step 4: no {COMMIT_MARKER}", "and 1 more", "--overwrite")
  assert rundir.checkpoint_steps(str(out)) == [4, 2] and not (out / rundir.UNREADABLE).exists()
