"""Stage 2 of a run: the evaluation before training, then the steps with logs, evals and checkpoints.

The loop knows nothing of the objective: it asks the task for each step's batch and its
held-out metrics, and runs the compiled step setup made. A ``SIGTERM`` (TPU or Kubernetes
preemption) is turned into a checkpoint and exit status 143; a ``kill -9`` loses at most
the steps since the last checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

import jlora
from jlora.finetune import distributed
from jlora.finetune.metrics import Reporters
from jlora.finetune.options import LoopOptions
from jlora.finetune.setup import Run

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: "stopped, resumable"


class _Preemption:
  """Turns SIGTERM (what TPU/Kubernetes preemption sends) into a flag checked between steps."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    if hasattr(signal, "SIGTERM"):
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def shown(task, values: dict[str, Any]) -> dict[str, Any]:
  """What the console shows of ``values``: the loss, throughput, generation metrics and the task's ``shown``."""
  keep = {"loss", "grad_norm", "tokens_per_s", "eval_loss", "exact_match", *task.shown,
          *(f"eval_{k}" for k in task.shown)}
  return {k: v for k, v in values.items() if k in keep}


def line(values: dict[str, Any]) -> str:
  return ", ".join(f"{k} {v:.0f}" if k == "tokens_per_s" else f"{k} {v:.4f}" for k, v in values.items())


def baseline(run: Run, say: Callable[[str], None]) -> dict[str, float]:
  """The task's metrics before training (kept in ``baseline.json``, read back on resume): of the base, or of
  the ``--init-adapter`` a run starts from (fresh adapters have B = 0: the base's numbers)."""
  path = os.path.join(run.out, "baseline.json")
  if run.start > 0 and os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
  else:
    start = jlora.combine(run.adapters, run.frozen)
    before = run.task.evaluate(start)
    host = distributed.gather(start)  # collective; generation runs on process 0 only
    if run.main_process:
      before.update(run.task.generation_eval(jlora.merge(host))[0])
    del host
    if run.main_process:
      with open(path, "w") as f:
        json.dump(before, f)
  say("before training: " + line(shown(run.task, before)))
  return before


def train(run: Run, o: LoopOptions, say: Callable[[str], None]) -> tuple[Any, Any]:
  """Runs steps ``run.start .. run.total``; returns the final ``(adapters, opt_state)``.

  Logs ``loss``, ``grad_norm``, ``tokens_per_s`` (and the task's metrics) every ``log_every``
  steps to ``metrics.jsonl``, with the eval metrics every ``eval_every`` steps (logged then as well,
  when ``eval_every`` is no multiple of ``log_every``); shows them on
  the progress bar, or prints them as lines with ``--no-progress``.
  """
  task, mesh = run.task, run.mesh
  adapters, opt_state = run.adapters, run.opt_state
  log = Reporters(run.out, o.reporters, start_step=run.start, config=run.run_info["train_config"],
                  enabled=run.main_process)
  bar = None
  if o.progress and run.main_process:
    from tqdm import tqdm

    bar = tqdm(total=run.total, initial=run.start, desc="lora", dynamic_ncols=True, file=sys.stdout)
  tokens_since, t_last, last_eval = 0, time.time(), None
  with _Preemption() as preempt:
    for step in range(run.start, run.total):
      local = task.batch(step, jlora.combine(adapters, run.frozen))
      batch = distributed.global_batch(local, mesh)
      if "attention_mask" in local:
        tokens_since += int(local["attention_mask"].sum()) * jax.process_count()
      adapters, opt_state, loss, gnorm, metrics = run.step(adapters, opt_state, run.frozen, batch,
                                                           jax.random.fold_in(run.rng, step))
      done = step + 1
      evaluate = done % o.eval_every == 0 or done == run.total
      if done % o.log_every == 0 or evaluate:  # an evaluation step is logged too, whatever --log-every is
        dt = max(time.time() - t_last, 1e-9)
        entry = {"step": done, "loss": float(loss), "grad_norm": float(gnorm), "tokens_per_s": tokens_since / dt,
                 **{k: float(v) for k, v in metrics.items()}, **task.pop_metrics()}
        if evaluate:
          last_eval = task.evaluate(jlora.combine(adapters, run.frozen))
          entry.update(last_eval)
        log.log(**entry)
        if bar is not None:
          postfix = {"loss": f"{entry['loss']:.4f}", "tok_s": f"{entry['tokens_per_s']:.0f}"}
          if last_eval is not None:
            postfix["eval"] = f"{next(iter(last_eval.values())):.4f}"
          postfix.update({k.split("/")[-1]: f"{v:.3f}" for k, v in entry.items() if k in task.shown})
          bar.set_postfix(**postfix)
        else:
          say(f"step {done}/{run.total}: " + line(shown(task, entry)))
        tokens_since, t_last = 0, time.time()
      if bar is not None:
        bar.update(1)
      run.checkpointer.save(done, adapters=adapters, opt_state=opt_state, rng=run.rng, meta=run.meta,
                            task_state=task.state(), force=preempt.requested or done == run.total)
      if preempt.requested and done < run.total:
        run.checkpointer.wait()
        if bar is not None:
          bar.close()
        say(f"SIGTERM: saved checkpoint at step {done}; rerun the same command to resume.")
        log.close()
        sys.exit(PREEMPTED_EXIT_CODE)
  if bar is not None:
    bar.close()
  log.close()
  run.checkpointer.wait()
  return adapters, opt_state
