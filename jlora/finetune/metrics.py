"""``metrics.jsonl`` logging and the loss-curve PNG."""

from __future__ import annotations

import json
import os
from typing import Any


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
