"""``run(cfg)``: a fine-tuning run as three stages around a task.

1. ``setup`` (``setup.py``): model, the task's data, adapters, optimizer, the compiled step,
   then the output directory and the resumed state;
2. ``loop`` (``loop.py``): the evaluation before training, then the steps;
3. ``finish`` (``finish.py``): the adapter saved, evaluated and exported, the summary.

The options go through ``run`` once: it splits ``TrainConfig`` into the groups each stage
reads (``options.py``) and hands each stage its own; the task (``tasks/``) owns the data,
batches, loss and metrics.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax

from jlora.finetune import distributed, loop, numerics, rundir
from jlora.finetune.config import TrainConfig
from jlora.finetune.finish import finish
from jlora.finetune.loaded import load_tokenizer
from jlora.finetune.loop import PREEMPTED_EXIT_CODE  # noqa: F401  (re-exported: the command's exit status)
from jlora.finetune.options import (BatchOptions, DataOptions, EvalOptions, LoopOptions, LoraOptions, ModelOptions,
                                    ObjectiveOptions, OptimOptions, OutputOptions, ProcessOptions, group)
from jlora.finetune.setup import check_model_dir, make_optimizer, setup  # noqa: F401  (make_optimizer: re-exported)
from jlora.finetune.tasks import TASKS


def run(cfg: TrainConfig, *, resume: bool = True, overwrite: bool = False) -> dict[str, Any]:
  """Runs a fine-tuning job; returns the summary also written to output_dir/summary.json.

  Args:
    cfg: the options.
    resume: continue from the newest readable checkpoint in ``output_dir``; if
      False, an ``output_dir`` that holds checkpoints is refused.
    overwrite: start fresh, deleting what an earlier run wrote to ``output_dir``
      (only once this run's model, data and adapters are set up).

  Raises:
    jlora.finetune.cli.UserError: bad data, model directory, targets, output directory,
      options that do not fit in memory, or a checkpoint of other options to resume
      (before any training; the message names the option to fix).
  """
  cfg = cfg.resolved()  # each task's defaults filled in (what the stages read and checkpoints record)
  data, model = group(cfg, DataOptions), group(cfg, ModelOptions)
  task = TASKS[data.task](data, group(cfg, BatchOptions), group(cfg, EvalOptions), group(cfg, ObjectiveOptions))
  if data.show_example >= 0:  # the data as the loss sees it, and nothing else: no weights are read
    print(task.show(load_tokenizer(check_model_dir(model)), data.show_example), flush=True)
    return {"shown": data.show_example}
  process = group(cfg, ProcessOptions)
  pinned = numerics.pin() if process.reproducible else "not pinned: --no-reproducible"
  if process.reproducible and pinned.startswith("not"):
    print(f"numerics: {pinned}", flush=True)
  distributed.initialize(process)
  output = group(cfg, OutputOptions)
  out = os.path.abspath(output.output_dir)
  resume = resume and not overwrite
  rundir.check(out, resume=resume, overwrite=overwrite)
  main_process = jax.process_index() == 0
  say = (lambda *a: print(*a, flush=True)) if main_process else (lambda *a: None)
  t_start = time.time()
  with rundir.removed_on_failure(out) as state:
    rundir.make(out)  # a directory that cannot be written is refused before anything else is done
    run_ = setup(task, model, group(cfg, LoraOptions), group(cfg, OptimOptions), group(cfg, BatchOptions),
                 group(cfg, LoopOptions), output, out=out, resume=resume, overwrite=overwrite,
                 train_config=cfg.to_dict(), say=say)
    before = loop.baseline(run_, say)
    state["started"] = True  # from here on a failure keeps the output directory
  adapters, opt_state = loop.train(run_, group(cfg, LoopOptions), say)
  return finish(run_, adapters, opt_state, before=before, output=output,
                base_model=model.model or os.path.abspath(model.model_dir), numerics=pinned, t_start=t_start,
                say=say)
