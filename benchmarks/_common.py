"""Shared pieces of the benchmarks: the anchor model, timing, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")

# The shape of the peer anchors in shared/reference/environment.md.
LLAMA = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=1024, max_position_embeddings=512)
BATCH, SEQ, RANK, ALPHA = 4, 256, 8, 16
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def block(x):
  jax.tree.map(lambda t: t.block_until_ready() if hasattr(t, "block_until_ready") else t, x)
  return x


def interleaved_times(fns: dict[str, Callable[[], object]], *, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
  """Times each fn once per round, alternating, so machine noise hits all alike."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return times


def median(xs):
  return statistics.median(xs)


def machine() -> dict:
  # The load average says how contended the (shared) machine was while timing.
  return {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
          "cpu_count": os.cpu_count(), "devices": [str(d) for d in jax.devices()],
          "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def write_result(name: str, result: dict) -> str:
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, f"{name}.json")
  result = {"benchmark": name, "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S"), **result}
  with open(path, "w") as f:
    json.dump(result, f, indent=2, sort_keys=False)
  print(json.dumps(result, indent=2))
  return path
