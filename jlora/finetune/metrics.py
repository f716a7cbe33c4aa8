"""Where a run's numbers go: ``metrics.jsonl``, TensorBoard, Weights & Biases, and the loss-curve PNG.

``metrics.jsonl`` is always written (one JSON object per logged step); ``--report-to
tensorboard,wandb`` adds TensorBoard event files (``output_dir/tensorboard``, through the
``tensorboard`` package's event writer) and a W&B run (``wandb``; its own environment
variables apply: ``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_MODE=offline``...). Metric
names are the task's (``loss``, ``eval_loss``, DPO's ``rewards/accuracies``...), the same
in every destination. A resumed run continues the same W&B run and tells TensorBoard to
drop the steps it logs again.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

REPORT_TO = ("tensorboard", "wandb")  # what --report-to accepts (besides "none")


class MetricsLog:
  """Appends one JSON object per line to ``path``."""

  def __init__(self, path: str, *, enabled: bool = True):
    self.path = path
    self.enabled = enabled

  def truncate_after(self, step: int) -> None:
    """Drops entries logged after ``step`` (a resumed run logs those steps again)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    kept = [e for e in self.read() if e.get("step", 0) <= step]
    with open(self.path, "w") as f:
      for e in kept:
        f.write(json.dumps(e) + "\n")

  def log(self, **entry: Any) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(entry) + "\n")

  def read(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]


class TensorBoardLog:
  """Scalars as TensorBoard event files in ``directory`` (``tensorboard --logdir DIRECTORY``)."""

  def __init__(self, directory: str, *, start_step: int = 0):
    try:
      from tensorboard.compat.proto.event_pb2 import Event, SessionLog  # optional dependency
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError as e:
      raise ImportError(f"--report-to tensorboard needs the tensorboard package ({e}); pip install tensorboard") \
          from None
    self._event = Event
    self._writer = EventFileWriter(directory)
    if start_step:  # a resumed run: TensorBoard drops what an earlier process logged after this step
      self._writer.add_event(Event(wall_time=time.time(), step=start_step,
                                   session_log=SessionLog(status=SessionLog.START)))

  def log(self, step: int, values: dict[str, float]) -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
    self._writer.add_event(self._event(wall_time=time.time(), step=step, summary=summary))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class WandbLog:
  """A Weights & Biases run; a resumed run (``out/wandb-run-id``) continues the same W&B run."""

  def __init__(self, out: str, *, config: dict[str, Any], name: str):
    try:
      import wandb  # optional dependency
    except ImportError as e:
      raise ImportError(f"--report-to wandb needs the wandb package ({e}); pip install wandb") from None
    id_file = os.path.join(out, "wandb-run-id")
    run_id = open(id_file).read().strip() if os.path.exists(id_file) else uuid.uuid4().hex[:8]
    with open(id_file, "w") as f:
      f.write(run_id)
    self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "jlora"), name=name, id=run_id,
                           resume="allow", dir=out, config=config, reinit="finish_previous")

  def log(self, step: int, values: dict[str, float]) -> None:
    self._run.log(dict(values), step=step)

  def close(self) -> None:
    self._run.finish()


class Reporters:
  """``metrics.jsonl`` plus the ``--report-to`` destinations, logged to together (main process only)."""

  def __init__(self, out: str, report_to: Sequence[str], *, start_step: int, config: dict[str, Any],
               enabled: bool = True):
    self.jsonl = MetricsLog(os.path.join(out, "metrics.jsonl"), enabled=enabled)
    self.jsonl.truncate_after(start_step)
    self._others: list[Any] = []
    if enabled:
      for name in report_to:
        if name == "tensorboard":
          self._others.append(TensorBoardLog(os.path.join(out, "tensorboard"), start_step=start_step))
        elif name == "wandb":
          self._others.append(WandbLog(out, config=config, name=os.path.basename(os.path.normpath(out))))

  def log(self, **entry: Any) -> None:
    self.jsonl.log(**entry)
    values = {k: v for k, v in entry.items() if k != "step"}
    for r in self._others:
      r.log(int(entry["step"]), values)

  def close(self) -> None:
    for r in self._others:
      r.close()


def plot_loss(entries: list[dict], path: str, *, title: str = "LoRA fine-tuning") -> str | None:
  """Writes train (and eval) loss against step to ``path``; returns it, or None without data."""
  train = [(e["step"], e["loss"]) for e in entries if "loss" in e]
  evals = [(e["step"], e["eval_loss"]) for e in entries if "eval_loss" in e]
  if not train:
    return None
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  ax.plot(*zip(*train), label="train loss")
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
