"""Will the train step fit? XLA's compile-time memory analysis against the memory the devices have left.

A run that cannot fit should say so before its first step, with the options that
would fit, not after minutes of evaluation with ``RESOURCE_EXHAUSTED``. The step is
compiled ahead of time (the loop then runs that very executable, so nothing is
compiled twice), its memory analysis gives the bytes it allocates beyond the arrays
already in memory, and that is compared with what the device has free.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jlora.finetune.cli import UserError
from jlora.memory import compare, format_table
from jlora.finetune.options import BatchOptions

HEADROOM = 0.9  # plan for 90% of the free memory: allocator fragmentation, the host's own needs
GiB = 2 ** 30


def step_bytes(compiled: Any) -> int:
  """Bytes a compiled step allocates per device beyond its arguments (already in memory).

  Temporaries plus the outputs that do not reuse a donated argument's buffer.
  """
  m = compiled.memory_analysis()
  return int(m.temp_size_in_bytes + max(m.output_size_in_bytes - m.alias_size_in_bytes, 0))


def available_bytes() -> int | None:
  """Free memory per local device: the accelerator's own figure, or the host's available RAM
  split over the local CPU devices; None when the platform does not say."""
  devices = jax.local_devices()
  stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  if devices[0].platform == "cpu":
    try:
      with open("/proc/meminfo") as f:
        for line in f:
          if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 // len(devices)
    except OSError:
      pass
    try:
      return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // len(devices)
    except (ValueError, OSError, AttributeError):
      return None
  return None


def compile_and_check(step: Any, args: tuple, *, batch: BatchOptions, remat: bool,
                      resize: Callable[[int], Any], available: Callable[[], int | None] = available_bytes) -> Any:
  """The compiled ``step`` for ``args``, or a ``UserError`` if it cannot fit, naming options that would.

  Args:
    step: the jitted train step.
    args: its arguments (the real arrays; only their shapes and shardings are used).
    batch: the run's batch options (for the suggestion).
    remat: whether ``--remat`` is on.
    resize: ``rows -> batch`` with ``rows`` sequences per micro-batch (the last argument of the
      step), used to estimate how memory grows with the batch.
    available: free bytes per device (default: ``available_bytes``).

  Raises:
    jlora.finetune.cli.UserError: the step needs more memory than the device has free.
  """
  compiled = step.lower(*args).compile()
  need, free = step_bytes(compiled), available()
  if free is None or need <= HEADROOM * free:
    return compiled
  rows = batch.batch_size
  fits = ""
  if rows > 1:  # memory ~ c + k * rows: one more compile at half the rows gives c and k
    half = max(rows // 2, 1)
    need_half = step_bytes(step.lower(*args[:-2], resize(half), args[-1]).compile())
    k = max((need - need_half) / (rows - half), 1.0)
    best = int((HEADROOM * free - (need - k * rows)) // k)
    if best >= 1:
      accum = math.ceil(rows * batch.grad_accum / best)
      fits = (f"--batch-size {best} --grad-accum {accum} (about the same {rows * batch.grad_accum} sequences per "
              f"step; estimated {(need - k * (rows - best)) / GiB:.1f} GiB)")
  others = (["--remat"] if not remat else []) + ["a shorter --max-seq-len"]
  raise UserError(
      f"the train step needs about {need / GiB:.1f} GiB per device beyond the weights (XLA's estimate for "
      f"--batch-size {rows} x --max-seq-len), but only {free / GiB:.1f} GiB are free; "
      + (f"use {fits}, or " if fits else "use ")
      + " or ".join(others) + " to fit")


def report_table(forward: Callable, base_params: Any, lora_cfg: Any, layout: Any,
                 inner: optax.GradientTransformation, *, batch: tuple[int, int]) -> str:
  """Full fine-tuning, LoRA, DoRA and QLoRA of this run's model, batch and optimizer, from shapes
  (``--memory-report``)."""
  def loss(params, ids):
    logits = forward(params, ids, jnp.ones_like(ids))[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base_params)
  ids = jax.ShapeDtypeStruct(batch, jnp.int32)
  reports, skipped = compare(loss, shapes, ids, config=lora_cfg, methods=("full", "lora", "dora", "qlora"),
                             optimizer=inner, layout=layout)
  lines = [f"memory per train step (XLA compile-time analysis; batch {batch[0]}x{batch[1]}, one micro-batch):",
           format_table(reports)]
  lines += [f"{name}: skipped ({why})" for name, why in skipped.items()]
  return "\n".join(lines)
