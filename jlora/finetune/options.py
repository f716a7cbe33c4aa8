"""What each stage of a run reads of ``TrainConfig``: one small frozen group of options per consumer.

``TrainConfig`` is the flat form users write (flags, a ``.toml`` file). A run hands
each stage only its groups, so a stage's signature says what it depends on:

====================  ===================================================  ======================
group                 options                                              read by
====================  ===================================================  ======================
``ModelOptions``      model, bf16, remat, quantize, double_quant,          setup (the base)
                      quant_blocksize, mesh, sharding
``LoraOptions``       init_adapter, targets, exclude, rank, alpha,         setup, ``VariantPolicy``
                      rslora, lora_dropout, init, dora, adalora_*,
                      loraplus_ratio
``OptimOptions``      lr, schedule, warmup_steps, weight_decay,            setup (optimizer, length)
                      clip_norm, steps, epochs
``DataOptions``       task, data, eval_data, eval_fraction,                the task
                      chat_template, train_on, skip_bad_lines,
                      max_seq_len, pack, show_example
``ObjectiveOptions``  beta, loss_type, label_smoothing, simpo_gamma,       the task
                      cpo_alpha, kto_*_weight, reference,
                      precompute_reference, logits_chunk,
                      router_aux_loss_coef; GRPO's:
                      num_generations, reward, scale_rewards,
                      num_iterations, epsilon, epsilon_high,
                      importance_sampling_level, dynamic_sampling,
                      max_completion_length, temperature, top_p,
                      top_k, stop
``BatchOptions``      batch_size, grad_accum, seed                         the task, setup
``EvalOptions``       eval_exact_match, max_new_tokens                     the task
``LoopOptions``       log_every, eval_every, save_every, keep_checkpoints, the loop
                      progress, report_to
``OutputOptions``     output_dir, save_merged, memory_report               setup, finish
``ProcessOptions``    coordinator, num_processes, process_id,              ``run`` (before JAX starts)
                      reproducible
====================  ===================================================  ======================

Every ``TrainConfig`` field is in exactly one group (tested).

Example:
  >>> from jlora.finetune import TrainConfig
  >>> from jlora.finetune.options import OptimOptions, group
  >>> group(TrainConfig(lr=1e-3), OptimOptions).lr
  0.001
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, TypeVar

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DEFAULT_MODEL = os.path.join(ASSETS, "tiny-base")
DEFAULT_DATA = os.path.join(ASSETS, "data", "reverse_words.train.jsonl")
DEFAULT_EVAL = os.path.join(ASSETS, "data", "reverse_words.eval.jsonl")

_frozen = dataclasses.dataclass(frozen=True, kw_only=True)


@_frozen
class ModelOptions:
  model: str
  bf16: bool
  remat: bool
  quantize: str
  double_quant: bool
  quant_blocksize: int
  mesh: str
  sharding: str

  @property
  def model_dir(self) -> str:
    return self.model or DEFAULT_MODEL

  @property
  def model_id(self) -> str:
    """The name checkpoints record: what the user passed, or the bundled default's name."""
    return self.model or "jlora/tiny-base (bundled)"


@_frozen
class LoraOptions:
  init_adapter: str
  targets: str
  exclude: str
  rank: int
  alpha: float
  rslora: bool
  lora_dropout: float
  init: str
  dora: bool
  adalora_target_rank: int
  adalora_tinit: int
  adalora_tfinal: int
  adalora_delta_t: int
  adalora_orth_reg: float
  loraplus_ratio: float


@_frozen
class OptimOptions:
  lr: float
  schedule: str
  warmup_steps: int
  weight_decay: float
  clip_norm: float
  steps: int
  epochs: float


@_frozen
class DataOptions:
  task: str
  data: str
  eval_data: str
  eval_fraction: float
  chat_template: bool
  train_on: str
  skip_bad_lines: bool
  max_seq_len: int
  pack: bool
  show_example: int

  @property
  def data_path(self) -> str:
    return self.data or DEFAULT_DATA

  @property
  def eval_path(self) -> str:
    """The held-out file: ``eval_data``, the bundled eval split with the bundled data, else ``""``."""
    if self.eval_data:
      return self.eval_data
    return DEFAULT_EVAL if not self.data else ""


@_frozen
class ObjectiveOptions:
  beta: float  # (a run's config is resolved first: each task's default filled in)
  loss_type: str
  label_smoothing: float
  simpo_gamma: float
  cpo_alpha: float
  kto_desirable_weight: float
  kto_undesirable_weight: float
  reference: str
  precompute_reference: bool
  logits_chunk: int
  router_aux_loss_coef: float | None  # None: config.json's when a router trains (SFT)
  # GRPO (--task grpo): rollouts, rewards, the clipped objective
  num_generations: int
  reward: tuple[str, ...]
  scale_rewards: str
  num_iterations: int
  epsilon: float
  epsilon_high: float | None  # None: epsilon
  importance_sampling_level: str
  dynamic_sampling: bool
  max_completion_length: int
  temperature: float
  top_p: float
  top_k: int
  stop: tuple[str, ...]


@_frozen
class BatchOptions:
  batch_size: int
  grad_accum: int
  seed: int


@_frozen
class EvalOptions:
  eval_exact_match: int
  max_new_tokens: int


@_frozen
class LoopOptions:
  log_every: int
  eval_every: int
  save_every: int
  keep_checkpoints: int
  progress: bool
  report_to: str

  @property
  def reporters(self) -> tuple[str, ...]:
    return tuple(r for r in self.report_to.split(",") if r and r != "none")


@_frozen
class OutputOptions:
  output_dir: str
  save_merged: bool
  memory_report: bool


@_frozen
class ProcessOptions:
  coordinator: str
  num_processes: int
  process_id: int
  reproducible: bool


GROUPS = (ModelOptions, LoraOptions, OptimOptions, DataOptions, ObjectiveOptions, BatchOptions, EvalOptions,
          LoopOptions, OutputOptions, ProcessOptions)

G = TypeVar("G")


def group(cfg: Any, cls: type[G]) -> G:
  """The options of group ``cls`` (one of ``GROUPS``) taken from a ``TrainConfig``."""
  return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})
