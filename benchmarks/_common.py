"""Shared pieces of the benchmarks: the anchor model, timing, result files, the smoke mode."""

from __future__ import annotations

import argparse
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

# --smoke: the same code paths as the real run on a model this small, one warmup and one timed
# round, so that the test suite runs every benchmark in seconds (tests/test_benchmarks_smoke*.py).
# The numbers mean nothing; the run only shows that the benchmark still works.
SMOKE_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
SMOKE_BATCH, SMOKE_SEQ = 2, 16


def block(x):
  jax.tree.map(lambda t: t.block_until_ready() if hasattr(t, "block_until_ready") else t, x)
  return x


def compiled_costs(compiled) -> dict:
  """FLOPs and memory from XLA's cost and memory analysis of a compiled step.

  ``peak_bytes`` = arguments + outputs + temporaries - outputs aliased to donated
  arguments: what the step holds at its peak, the number users compare.
  """
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  out = {"flops": float(cost["flops"]), "temp_bytes": int(mem.temp_size_in_bytes),
         "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
         "alias_bytes": int(mem.alias_size_in_bytes)}
  out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
  return out


def donating_runner(step, args, donated: bool) -> Callable[[], None]:
  """Calls a train step ``(params, opt_state, ...) -> (params, opt_state, loss)`` repeatedly; when
  ``donated``, its new params and optimizer state go back in (the donated inputs are gone)."""
  state = list(args)

  def run():
    out = step(*state)
    if donated:
      state[0], state[1] = out[0], out[1]
      block(out[2])
    else:
      block(out)

  return run


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


def add_smoke_flag(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """``--smoke`` (tiny shapes, one warmup and one timed round) and ``--out`` (where the JSON goes)."""
  ap.add_argument("--smoke", action="store_true",
                  help="tiny shapes, 1 warmup + 1 timed round, a few seconds: checks that the benchmark runs "
                       "(what the test suite does); writes no result file unless --out is given")
  ap.add_argument("--out", default=None, metavar="PATH",
                  help="write the result JSON to PATH instead of benchmarks/results/<name>.json")
  return ap


def shape_of(args: argparse.Namespace, *, llama: dict = LLAMA, batch: int = BATCH, seq: int = SEQ) -> dict:
  """``dict(llama=, batch=, seq=)``: the benchmark's model config and batch, or the tiny ones with ``--smoke``."""
  if args.smoke:
    return dict(llama=SMOKE_LLAMA, batch=SMOKE_BATCH, seq=SMOKE_SEQ)
  return dict(llama=llama, batch=batch, seq=seq)


def rounds_of(args: argparse.Namespace, rounds: int, warmup: int = 2) -> dict:
  """``interleaved_times`` keywords: the requested rounds, or 1 round after 1 warmup with ``--smoke``."""
  return {"rounds": 1, "warmup": 1} if args.smoke else {"rounds": rounds, "warmup": warmup}


def write_result(name: str, result: dict, *, args: argparse.Namespace | None = None) -> str | None:
  """Prints the result and writes it to ``--out`` or ``benchmarks/results/<name>.json``.

  A ``--smoke`` run writes only to an explicit ``--out``: its numbers must never replace a real
  run's file. Returns the path written, or None.
  """
  smoke = bool(args is not None and args.smoke)
  out = getattr(args, "out", None)
  result = {"benchmark": name, "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            **({"smoke": True} if smoke else {}), **result}
  print(json.dumps(result, indent=2))
  if smoke and not out:
    print(f"--smoke: wrote no result file (benchmarks/results/{name}.json is left as it was)")
    return None
  path = out or os.path.join(RESULTS_DIR, f"{name}.json")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2, sort_keys=False)
  if out:
    print(f"wrote {path}")
  return path
