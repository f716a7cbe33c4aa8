"""Training checkpoints: adapters + optimizer state + step + rng, via Orbax CheckpointManager.

Only the adapters are saved, never the frozen base. Each checkpoint carries the
same self-describing metadata as ``jlora.save_adapter`` (ranks, alphas,
scaling, layouts, base model id and weights fingerprint) plus the training
config, so a checkpoint is refused by a run on another base model.

Resuming takes the newest *readable* checkpoint: one whose save did not finish
(no commit marker), whose metadata is not valid JSON or whose array files are
truncated is reported, moved to ``checkpoints.unreadable/`` and skipped. A
checkpoint that is readable but belongs to another base or other options is an
error, never skipped.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jlora import _checkpoint as ck
from jlora._partition import split
from jlora.finetune.cli import UserError, quiet_abandoned_reads
from jlora.finetune.rundir import UNREADABLE

COMMIT_MARKER = "commit_success.txt"  # Orbax writes it last, into every finished checkpoint
# What the command line says to start over (the hint of every "cannot resume" error).
START_FRESH = "start fresh with --overwrite (or give a new --output-dir)"


class UnreadableCheckpoint(Exception):
  """A checkpoint whose files cannot be read (the message says which part and why)."""


class TrainCheckpointer:
  """Saves and restores training state under ``directory/<step>`` (Orbax ``CheckpointManager``)."""

  def __init__(self, directory: str, *, keep: int, save_every: int):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every, create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, *, adapters, opt_state, rng, meta: dict, task_state: Any = None,
           force: bool = False) -> bool:
    """Saves step ``step``'s state (when ``save_every`` says so, or ``force``); ``task_state``: the
    task's own arrays (``Task.state()``: e.g. a rollout batch reused over several steps)."""
    state = {
        "adapters": ck.adapter_state(adapters),
        "opt_state": list(jax.tree.leaves(opt_state)),
        "step": np.int64(step),
        "rng": np.asarray(jax.random.key_data(rng)),
    }
    if task_state is not None:
      state["task"] = task_state
    meta = {**meta, "step": int(step), "data_position": int(step)}
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def _read(self, step: int, what: str, read: Callable):
    quiet_abandoned_reads()  # a failed read's late callbacks would print tracebacks
    try:
      return read()
    except Exception as e:  # noqa: BLE001  (narrowed below)
      # What Orbax/TensorStore raise for bad files: ValueError, KeyError, OSError (JSON and TensorStore
      # errors among them) and, for a damaged array file, a bare Exception ("Encountered error while
      # reading array index ..."): Orbax 0.12 wraps TensorStore's read errors in one. Any other type is
      # a bug, never a reason to skip a checkpoint.
      if not isinstance(e, (ValueError, KeyError, OSError)) and type(e) is not Exception:
        raise
      raise UnreadableCheckpoint(f"{what}: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None

  def restore(self, step: int, *, base_params, adapters_template, opt_state_template, rng_template,
              task_state_template: Any = None, check: Callable[[dict, str], None] | None = None):
    """Returns ``(adapters, opt_state, rng, meta, task_state)``; checks base model and LoRA config first.

    ``check(meta, where)`` is called with the checkpoint's metadata before any array is read;
    it raises to refuse the checkpoint (e.g. ``UserError``: other training options).

    Raises:
      UnreadableCheckpoint: the checkpoint's files cannot be read.
      jlora.AdapterMismatchError: it belongs to another base model or other adapters.
      UserError: it holds another optimizer state (other training options).
    """
    where = f"checkpoint {self.directory}/{step}"
    if not os.path.exists(os.path.join(self.directory, str(step), COMMIT_MARKER)):
      raise UnreadableCheckpoint(f"no {COMMIT_MARKER} (its save did not finish)")
    meta = self._read(step, "metadata", lambda: self.read_meta(step))
    if not isinstance(meta, dict) or not isinstance(meta.get("adapters"), dict):
      raise UnreadableCheckpoint("metadata: not a jlora training checkpoint's metadata")
    ck.verify_base(meta, base_params, where=where,
                   fix="Resume with the --model this run was started with, or " + START_FRESH + ".")
    if check is not None:
      check(meta, where)
    current = ck.adapter_metadata(adapters_template, base_fingerprint="")["adapters"]
    if meta["adapters"] != current:
      raise ck.AdapterMismatchError(
          f"{where} was written with other adapters (targets, ranks or layouts) than this run "
          f"configures; use the same LoRA options, or {START_FRESH}.")
    abstract = {
        "adapters": jax.tree.map(_abstract, ck.adapter_state(adapters_template)),
        "opt_state": [_abstract(x) for x in jax.tree.leaves(opt_state_template)],
        "step": jax.ShapeDtypeStruct((), np.int64),
        "rng": _abstract(np.asarray(jax.random.key_data(rng_template))),
    }
    if task_state_template is not None:
      abstract["task"] = jax.tree.map(_abstract, task_state_template)
    stored = self._read(step, "array metadata", lambda: self.manager.item_metadata(step)["state"].tree)
    want = jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), abstract)
    try:
      have = jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), stored)
    except (AttributeError, TypeError):
      raise UnreadableCheckpoint("array metadata: not a jlora training checkpoint") from None
    if jax.tree.structure(want) != jax.tree.structure(have) or jax.tree.leaves(want) != jax.tree.leaves(have):
      raise UserError(f"{where} holds another optimizer state than this run builds (its training options, "
                      f"e.g. --clip-norm or --schedule, differ); rerun with the options it was started with, "
                      f"or {START_FRESH}.")
    state = self._read(step, "arrays", lambda: self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state)
    adapters = split(ck.attach(base_params, meta, state["adapters"], where=where))[0]
    treedef = jax.tree.structure(opt_state_template)
    opt_state = jax.tree.unflatten(treedef, state["opt_state"])
    rng = jax.random.wrap_key_data(np.asarray(state["rng"]))
    return adapters, opt_state, rng, meta, state.get("task")

  def restore_newest_readable(self, *, say: Callable[[str], None], **templates):
    """Restores the newest readable checkpoint: ``(step, (adapters, opt_state, rng, meta, task_state))``, or None.

    Each unreadable checkpoint newer than it is reported through ``say`` and
    moved to ``../checkpoints.unreadable/<step>`` (kept for inspection; the
    resumed run writes that step again).

    Raises:
      UserError: checkpoints exist but none is readable (nothing is moved).
    """
    skipped: list[tuple[int, str]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.restore(step, **templates)
      except UnreadableCheckpoint as e:
        say(f"checkpoint {self.directory}/{step} is unreadable ({e}); trying an older one")
        skipped.append((step, str(e)))
        continue
      for bad, _ in skipped:
        moved = self._move_aside(bad)
        say(f"moved unreadable checkpoint {self.directory}/{bad} to {moved}")
      if skipped:
        self.manager.reload()
      return step, restored
    if skipped:
      raise UserError(
          f"no readable checkpoint in {self.directory} (step {skipped[0][0]}: {skipped[0][1]}"
          + (f"; and {len(skipped) - 1} more" if len(skipped) > 1 else "") + f"); cannot resume: {START_FRESH}.")
    return None

  def _move_aside(self, step: int) -> str:
    target_dir = os.path.join(os.path.dirname(self.directory), UNREADABLE)
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, str(step))
    if os.path.exists(target):
      target = f"{target}.{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.move(os.path.join(self.directory, str(step)), target)
    return target

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _abstract(x) -> jax.ShapeDtypeStruct:
  sharding = x.sharding if isinstance(x, jax.Array) else None
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
