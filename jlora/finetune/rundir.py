"""A run's output directory: what an earlier run left there, ``--overwrite``, and failed starts.

A run never destroys an earlier one by accident: ``--no-resume`` into a
directory that holds checkpoints is refused at start (not after training, at
the final save), ``--overwrite`` deletes only the files a run writes (never
anything else in the directory), and a run that fails before training removes
the directory if it created it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

from jlora.finetune.cli import UserError

CHECKPOINTS = "checkpoints"
UNREADABLE = "checkpoints.unreadable"  # unreadable checkpoints are moved here, not deleted
# Everything a run writes into its output directory (what --overwrite deletes).
RUN_OUTPUTS = (CHECKPOINTS, UNREADABLE, "adapter", "peft", "merged", "metrics.jsonl", "baseline.json",
               "summary.json", "loss_curve.png", "eval_examples.jsonl", "tensorboard", "wandb", "wandb-run-id")


def checkpoint_steps(out: str) -> list[int]:
  """Steps of the checkpoint directories in ``out/checkpoints`` (readable or not), newest first.

  Example:
    >>> import os, tempfile
    >>> from jlora.finetune.rundir import checkpoint_steps
    >>> out = tempfile.mkdtemp()
    >>> for step in ("2", "4", "4.orbax-checkpoint-tmp-1"):
    ...   os.makedirs(os.path.join(out, "checkpoints", step))
    >>> checkpoint_steps(out)
    [4, 2]
  """
  directory = os.path.join(out, CHECKPOINTS)
  if not os.path.isdir(directory):
    return []
  return sorted((int(n) for n in os.listdir(directory)
                 if n.isdigit() and os.path.isdir(os.path.join(directory, n))), reverse=True)


def check(out: str, *, resume: bool, overwrite: bool) -> None:
  """Refuses, before any work, an output directory this run would clobber.

  Raises:
    UserError: ``out`` is a file, or holds checkpoints while neither resuming
      nor overwriting.

  Example:
    >>> import os, tempfile
    >>> from jlora.finetune.rundir import check
    >>> out = tempfile.mkdtemp()
    >>> os.makedirs(os.path.join(out, "checkpoints", "8"))
    >>> try:
    ...   check(out, resume=False, overwrite=False)
    ... except ValueError as e:
    ...   print(str(e).split(";")[0])
    --output-dir ... already holds checkpoints of an earlier run (step 8)
  """
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--output-dir {out!r} is a file; give a directory")
  parent = out
  while not os.path.exists(parent):  # the nearest existing ancestor must be a directory
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(f"--output-dir {out!r}: {parent!r} is a file, not a directory; give another --output-dir")
  steps = checkpoint_steps(out)
  if steps and not resume and not overwrite:
    raise UserError(
        f"--output-dir {out} already holds checkpoints of an earlier run (step {steps[0]}); --no-resume would "
        "train from scratch and then clash with them. Give a new --output-dir, or pass --overwrite to delete "
        "that run's checkpoints and outputs, or drop --no-resume to continue it.")


def make(out: str) -> None:
  """Creates ``out`` (and its parents) and checks that files can be written in it.

  Raises:
    UserError: ``out`` cannot be created or written to (a read-only file system, no permission,
      a file in the way); the message names the directory and the error.

  Example:
    >>> import os, tempfile
    >>> from jlora.finetune.rundir import make
    >>> out = os.path.join(tempfile.mkdtemp(), "a", "run")
    >>> make(out); os.path.isdir(out)
    True
  """
  try:
    os.makedirs(out, exist_ok=True)
    probe = os.path.join(out, f".jlora-write-test-{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f"--output-dir {out!r}: cannot write there ({type(e).__name__}: {e.strerror or e}); give a "
                    "directory you can write to") from None


def clear(out: str) -> list[str]:
  """Deletes what an earlier run wrote into ``out`` (``RUN_OUTPUTS`` only); returns the names deleted.

  Example:
    >>> import os, tempfile
    >>> from jlora.finetune.rundir import clear
    >>> out = tempfile.mkdtemp()
    >>> os.makedirs(os.path.join(out, "checkpoints", "8"))
    >>> _ = open(os.path.join(out, "notes.txt"), "w").write("mine")
    >>> clear(out), sorted(os.listdir(out))
    (['checkpoints'], ['notes.txt'])
  """
  removed = []
  for name in RUN_OUTPUTS:
    path = os.path.join(out, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    elif os.path.lexists(path):
      os.remove(path)
    else:
      continue
    removed.append(name)
  return removed


@contextlib.contextmanager
def removed_on_failure(out: str) -> Iterator[dict]:
  """Removes ``out`` if this block created it and fails before ``state["started"]`` is set.

  The run sets ``state["started"] = True`` when training begins; a failure
  before that (bad data, a wrong model, a bug in setup) then leaves no empty
  or half-written output directory behind.

  Example:
    >>> import os, tempfile
    >>> from jlora.finetune.rundir import removed_on_failure
    >>> out = os.path.join(tempfile.mkdtemp(), "run")
    >>> try:
    ...   with removed_on_failure(out) as state:
    ...     os.makedirs(out)
    ...     raise ValueError("bad data")
    ... except ValueError:
    ...   pass
    >>> os.path.exists(out)
    False
  """
  existed = os.path.exists(out)
  state = {"started": False}
  try:
    yield state
  except BaseException:
    if not existed and not state["started"] and os.path.isdir(out):
      shutil.rmtree(out, ignore_errors=True)
    raise
