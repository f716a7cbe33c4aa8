"""The contract between the training loop and a training objective (a *task*).

A task owns everything that depends on the objective: reading and tokenizing its
records, the batch of each step, the loss, and the held-out metrics. The stages
around it (``setup``, ``loop``, ``finish``) own the rest: the model, the adapters,
the optimizer, the checkpoints, the output directory. A new objective (DPO, KTO,
GRPO, ...) is one new ``Task`` subclass registered in ``jlora.finetune.tasks``;
nothing in the loop changes.

What the loop asks of a task, in order:

0. ``show(tokenizer, index)`` instead of everything below, for ``--show-example``.
1. ``prepare(ctx)`` once, before anything is written: read and check the data
   (a ``DataError`` names the file and line), tokenize it.
2. ``start(params)`` once with the initial LoRA tree (before a checkpoint is restored),
   then ``steps_per_epoch`` to size the run.
3. ``batch(step, params)`` at every step, with the current LoRA tree (a task that
   generates its data, as GRPO's rollouts, uses it): this process's rows of the step,
   every array shaped ``(grad_accum, rows, ...)``. It depends only on ``step``, the
   params and the task's state, so that a resumed run sees the same batches; whatever
   else it needs to resume identically (a rollout batch reused over several steps) is
   ``state()``, saved in every checkpoint and given back by ``set_state`` on resume.
   ``example_batch()`` is a batch of the same shapes, for compiling the step;
   ``pop_metrics()`` is logged with the step's (e.g. rollout rewards, tokens/s).
4. ``loss(params, micro_batch, key)`` inside the jitted step, once per micro-batch:
   ``(total, count, metrics)``. The step's loss is ``Σ total / Σ count`` over the
   micro-batches; each entry of ``metrics`` is a micro-batch's value (a mean) and the
   step reports its mean over the micro-batches, NaN ignored. ``params`` is the full LoRA tree; the gradient is
   taken with respect to its adapters. ``key`` is None when no dropout is on.
5. ``evaluate(params)`` every ``eval_every`` steps and before and after training:
   held-out metrics, ``eval_loss`` first.
6. ``generation_eval(params)`` before and after training, on the main process:
   metrics that need generation (exact match) and example rows; may return
   ``({}, [])``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import numpy as np

import jlora.data

from jlora.finetune.options import BatchOptions, DataOptions, EvalOptions, ObjectiveOptions

Params = Any


@dataclasses.dataclass(frozen=True)
class TaskContext:
  """What a task may use of the run: the model, its tokenizer, the processes, and how to talk."""

  loaded: Any  # jlora.finetune.model.LoadedModel
  say: Callable[[str], None]  # prints on the main process only
  process_index: int = 0
  process_count: int = 1

  @property
  def tokenizer(self) -> Any:
    return self.loaded.tokenizer


class Task(abc.ABC):
  """A training objective: its data, batches, loss and metrics (see the module docstring)."""

  name: ClassVar[str]
  # The metrics worth a place on the console's lines and progress bar (besides loss and eval_loss, and
  # the same names prefixed eval_); metrics.jsonl and --report-to get every metric.
  shown: ClassVar[tuple[str, ...]] = ()

  def __init__(self, data: DataOptions, batch: BatchOptions, evaluation: EvalOptions, objective: ObjectiveOptions):
    self.data_options = data
    self.batch_options = batch
    self.eval_options = evaluation
    self.objective = objective

  @abc.abstractmethod
  def prepare(self, ctx: TaskContext) -> None:
    """Reads, checks and tokenizes the data.

    Raises:
      jlora.data.DataError: bad data (the message names the file and line).
    """

  def start(self, params: Params) -> None:
    """Called once with the initial LoRA tree (fresh, or ``--init-adapter``), before the step compiles
    and before a checkpoint is restored: e.g. to precompute a reference's log-probs."""
    del params

  @property
  @abc.abstractmethod
  def steps_per_epoch(self) -> int:
    """Optimizer steps in one pass over the training data."""

  @abc.abstractmethod
  def batch(self, step: int, params: Params) -> dict[str, np.ndarray]:
    """This process's part of step ``step``'s batch, each array ``(grad_accum, rows, ...)``; ``params`` is the
    current LoRA tree (None when only shapes matter)."""

  def example_batch(self) -> dict[str, np.ndarray]:
    """A batch of the step's shapes (what the step is compiled and its memory checked with)."""
    return self.batch(0, None)

  def state(self) -> Any:
    """What a resumed run needs beyond the adapters, optimizer and rng (arrays of fixed shapes), or None."""
    return None

  def set_state(self, state: Any) -> None:
    """Takes back ``state()`` from the checkpoint a run resumes from."""
    del state

  def pop_metrics(self) -> dict[str, float]:
    """Metrics of the batches made since the last call (logged with the step's)."""
    return {}

  @abc.abstractmethod
  def loss(self, params: Params, batch: dict[str, jax.Array], key: jax.Array | None
           ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """``(total, count, metrics)`` of one micro-batch (traced inside the jitted step)."""

  @abc.abstractmethod
  def evaluate(self, params: Params) -> dict[str, float]:
    """Held-out metrics of ``params`` (a LoRA tree or plain base parameters), ``eval_loss`` first."""

  @abc.abstractmethod
  def show(self, tokenizer: Any, index: int) -> str:
    """Training example ``index`` as the loss sees it (``--show-example``), its trained tokens marked.

    Raises:
      jlora.data.DataError: no such example, or bad data.
    """

  def generation_eval(self, params: Params) -> tuple[dict[str, float], list[dict]]:
    """Metrics that need generation, and example rows (``eval_examples.jsonl``); main process only."""
    del params
    return {}, []

  def describe(self) -> dict[str, Any]:
    """What the run summary records about the task's data."""
    return {"task": self.name}

  def fingerprint(self) -> str:
    """A digest of the training data as the loss sees it (tokens and masks); checked on resume."""
    return ""


def named_jit(name: str, fn: Callable) -> Callable:
  """``jax.jit(fn)`` under ``name``, so that JAX's compile logs and profiles say which program it is
  (``Compiling jit(eval_batch)``) rather than ``jit(<lambda>)``."""
  fn.__name__ = fn.__qualname__ = name
  return jax.jit(fn)


def holdout(examples: list, data_options: DataOptions, seed: int, *, at_least: int = 1,
            contiguous: bool = False) -> tuple[list, list]:
  """``(train, held_out)``: ``--eval-fraction`` of ``--data`` held out (at least ``at_least`` examples), at
  random from ``seed``, or the last ones with ``contiguous`` (examples that must stay together).

  Raises:
    jlora.data.DataError: nothing would be left to train on.
  """
  n_eval = max(at_least, int(len(examples) * data_options.eval_fraction))
  if len(examples) - n_eval < 1:
    raise jlora.data.DataError(
        f"--data {data_options.data_path}: {len(examples)} example(s), and {n_eval} of them are held out for "
        f"evaluation (--eval-fraction {data_options.eval_fraction}), leaving none to train on; add data or give "
        "--eval-data")
  if contiguous:
    return examples[:-n_eval], examples[-n_eval:]
  order = np.random.default_rng(seed).permutation(len(examples))
  return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]
