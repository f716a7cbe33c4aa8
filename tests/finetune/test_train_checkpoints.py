"""Resuming past corrupted checkpoints: skip what cannot be read, say so, fail clearly if nothing can."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cli_runs import SHORT, assert_user_error, finetune

import jlora
from jlora.finetune import model as model_lib
from jlora.finetune import rundir
from jlora.finetune.checkpoint import COMMIT_MARKER, TrainCheckpointer
from jlora.finetune.config import DEFAULT_MODEL


def _truncate_arrays(step_dir):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files
  for p in files:
    with open(p, "r+b") as f:
      f.truncate(p.stat().st_size // 2)


def _truncate_one_data_file(step_dir):
  """The issue's case: one array file of the newest checkpoint cut in half (a kill -9 mid-write)."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"
           and p.parent.parent.name.startswith("ocdbt.process_")]
  biggest = max(files, key=lambda p: p.stat().st_size)
  with open(biggest, "r+b") as f:
    f.truncate(biggest.stat().st_size // 2)


def _corrupt_metadata(step_dir):
  (step_dir / "meta" / "metadata").write_text('{"format": "jlora-adapter/1", "adapters": {')


def _adapters(path):
  lp = jlora.load_adapter(str(path), model_lib.load(DEFAULT_MODEL).params)
  return {p: (np.asarray(w.a), np.asarray(w.b)) for p, w in jlora._checkpoint.adapter_weights(lp).items()}


@pytest.mark.parametrize("corrupt,reason", [(_truncate_arrays, "(array metadata: ValueError"),
                                            (_truncate_one_data_file, "(arrays: Exception: Encountered error"),
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


# A failed TensorStore read abandons its sibling reads; their futures die unobserved (the command
# silences that noise with jlora.finetune.cli.quiet_abandoned_reads; pytest reports it itself).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_each_file_damaged_alone_is_skipped_or_harmless(tmp_path):
  """Every file of a checkpoint cut in half, one at a time: the newest checkpoint is either restored
  exactly (the file was not needed) or reported, moved aside, and the older one restored. Never an
  error, never other values."""
  base = {"q": {"kernel": jnp.ones((256, 256))}, "v": {"kernel": jnp.ones((256, 128))}}
  lp = jlora.init(jax.random.key(0), base, jlora.LoraConfig(rank=16, targets=".*/kernel"))
  adapters, _ = jlora.split(lp)
  tx = optax.adam(1e-3)
  states = {}
  for step in (1, 2):  # other values at each step, so that the restored step shows in the arrays
    adapters = jax.tree.map(lambda x: x + step, adapters)
    states[step] = (adapters, tx.init(adapters), jax.random.key(step))
  meta = jlora._checkpoint.adapter_metadata(adapters, base_model="m", base_fingerprint=jlora.fingerprint(base))
  good = tmp_path / "good" / "checkpoints"
  ckpt = TrainCheckpointer(str(good), keep=3, save_every=1)
  for step, (a, o, r) in states.items():
    ckpt.save(step, adapters=a, opt_state=o, rng=r, meta=meta, force=True)
  ckpt.wait()
  files = sorted(p.relative_to(good / "2") for p in (good / "2").rglob("*") if p.is_file())
  assert any(p.parts[:2] == ("state", "ocdbt.process_0") and p.parent.name == "d" for p in files), files
  outcomes = {}
  for i, rel in enumerate(files):
    work = tmp_path / f"damaged{i}" / "checkpoints"  # a new path each time: TensorStore caches by path
    shutil.copytree(good, work)
    damaged = work / "2" / rel
    with open(damaged, "r+b") as f:
      f.truncate(os.path.getsize(damaged) // 2)
    said = []
    step, (a, o, r, _, _) = TrainCheckpointer(str(work), keep=3, save_every=1).restore_newest_readable(
        say=said.append, base_params=base, adapters_template=states[2][0], opt_state_template=states[2][1],
        rng_template=states[2][2])
    want = states[step]
    for got, exp in zip(jax.tree.leaves((a, o)), jax.tree.leaves(want[:2])):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(exp), err_msg=str(rel))
    assert np.array_equal(jax.random.key_data(r), jax.random.key_data(want[2])), rel
    if step == 1:
      assert said[0].startswith(f"checkpoint {work}/2 is unreadable (") and "trying an older one" in said[0], said
      assert (work.parent / "checkpoints.unreadable" / "2").is_dir(), rel
    else:
      assert not said, (rel, said)
    outcomes[str(rel)] = step
  # The array data, the array metadata and the JSON metadata cannot be lost silently: each is needed.
  for needed in ("meta/metadata", "state/_METADATA", "state/manifest.ocdbt"):
    assert outcomes[needed] == 1, outcomes
  assert any(step == 1 for rel, step in outcomes.items() if "/ocdbt.process_0/d/" in rel), outcomes
