"""Stage 1 of a run: everything before the first step, checked before anything is written.

``setup`` loads the model and the task's data, creates the adapters and the optimizer,
compiles the train step and checks that it fits in memory, then (only then) prepares
the output directory and restores the newest readable checkpoint. Every user mistake
it can find is a ``UserError`` raised before the output directory is touched.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

import jlora
from jlora import _checkpoint as ck
from jlora._lazy import is_lazy_node
from jlora._tree import leaves_with_paths
from jlora.finetune import adapters as adapters_lib
from jlora.finetune import distributed, memory_check, rundir
from jlora.finetune import model as model_lib
from jlora.finetune import quantize as quantize_lib
from jlora.finetune.checkpoint import START_FRESH, TrainCheckpointer
from jlora.finetune.cli import UserError
from jlora.finetune.config import resume_conflicts
from jlora.finetune.loaded import LoadedModel, MissingWeightsError, UnsupportedModelError
from jlora.finetune.options import (BatchOptions, LoopOptions, LoraOptions, ModelOptions, OptimOptions,
                                    OutputOptions)
from jlora.finetune.policy import VariantPolicy
from jlora.finetune.step import make_train_step
from jlora.finetune.tasks import Task, TaskContext

Params = Any
# Fewer optimizer steps than this with the default epochs get a hint: small data sets need more passes.
FEW_STEPS = 100


@dataclasses.dataclass
class Run:
  """What setup hands to the loop and to finish."""

  out: str  # the output directory (absolute)
  loaded: LoadedModel
  task: Task
  policy: VariantPolicy
  base_params: Params  # the (possibly 4-bit) base the adapters train on
  adapters: Params
  frozen: Params
  opt_state: Any
  rng: jax.Array
  step: Callable  # the compiled train step: (adapters, opt_state, frozen, batch, key) -> (..., loss, gnorm)
  mesh: Any
  start: int  # the first step to run (0, or the resumed checkpoint's step)
  total: int  # the last step
  checkpointer: TrainCheckpointer
  meta: dict  # the adapter metadata written with every checkpoint
  run_info: dict  # what the saved adapter records about the run
  fingerprint: str  # the base weights'
  counts: jlora.ParamCount
  quantization: dict | None
  main_process: bool


def make_optimizer(o: OptimOptions, total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warmup, then cosine/linear decay or a constant rate, after global-norm clipping."""
  warmup = min(o.warmup_steps, max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  if o.schedule == "cosine":
    after = optax.cosine_decay_schedule(o.lr, decay_steps)
  elif o.schedule == "linear":
    after = optax.linear_schedule(o.lr, 0.0, decay_steps)
  else:
    after = optax.constant_schedule(o.lr)
  sched = optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), after], [warmup]) if warmup else after
  parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
  parts.append(optax.adamw(sched, weight_decay=o.weight_decay))
  return optax.chain(*parts)


def check_model_dir(o: ModelOptions) -> str:
  """``--model``'s directory (or the bundled one's), or a ``UserError`` if it is not a model directory."""
  where = f"--model {o.model!r}" if o.model else f"the bundled model {o.model_dir!r}"
  if not os.path.isdir(o.model_dir):
    raise UserError(f"{where} is not a directory; give a local Hugging Face model directory (config.json "
                    "and weights)")
  if not os.path.exists(os.path.join(o.model_dir, "config.json")):
    raise UserError(f"{where} has no config.json; give a Hugging Face model directory")
  return o.model_dir


def load_model(o: ModelOptions, mesh=None) -> LoadedModel:
  """The base model of ``--model`` (or the bundled one); a ``UserError`` for a bad directory."""
  where = f"--model {o.model!r}" if o.model else f"the bundled model {o.model_dir!r}"
  check_model_dir(o)
  try:
    return model_lib.load(o.model_dir, bf16=o.bf16, remat=o.remat, model_id=o.model_id, mesh=mesh,
                          sharding=o.sharding)
  except FileNotFoundError as e:  # the loader's "no weights" (or a tokenizer file missing)
    raise UserError(f"{where}: {e}") from None
  except (jlora.models.CheckpointError, MissingWeightsError, UnsupportedModelError) as e:
    raise UserError(str(e) if str(e).startswith("--model") else f"{where}: {e}") from None


def _module_names(layout) -> list[str]:
  """Names of the modules whose kernels the model multiplies with (what --targets can list)."""
  return sorted({p.split("/")[-2] for p, lay in layout.items() if p.endswith("/kernel") and not lay.embedding
                 and "/" in p})


def lora_config(o: LoraOptions, policy: VariantPolicy, base_params, loaded: LoadedModel) -> jlora.LoraConfig:
  """The LoRA options as a ``jlora.LoraConfig`` for this model, or a ``UserError`` naming the option."""
  model_id, layout = loaded.model_id, loaded.layout
  try:
    targets = loaded.resolve_targets(o.targets)
    lora_cfg = policy.lora_config(targets)
  except ValueError as e:  # jlora's checks of the options (user input)
    raise UserError(f"--targets {o.targets!r} on {model_id}: {e}") from None
  matched = [path for path, _ in leaves_with_paths(base_params, is_leaf=is_lazy_node) if re.fullmatch(targets, path)]
  if matched and o.exclude and all(re.fullmatch(o.exclude, path) for path in matched):
    raise UserError(f"--exclude {o.exclude!r} removes all {len(matched)} parameters --targets {o.targets!r} "
                    f"selects (e.g. {matched[0]!r}); narrow --exclude")
  if not matched:
    shown = f" (the regex {targets!r})" if targets != o.targets else ""
    raise UserError(f"--targets {o.targets!r}{shown} matches no parameter of {model_id}; use all-linear, "
                    f"module names of this model ({','.join(_module_names(layout))}) or a regex (fullmatch) on "
                    f"its '/'-joined parameter paths such as "
                    f"{next((p for p, lay in layout.items() if not lay.embedding), '')!r}")
  return lora_cfg


def _init_adapters(o: LoraOptions, seed: int, base_params, lora_cfg, layout, mesh, model_id: str):
  try:
    return distributed.init_adapters(jax.random.key(seed), base_params, lora_cfg, layout, mesh,
                                     from_values=VariantPolicy.needs_base_values(lora_cfg))
  except ValueError as e:  # jlora.init's checks of the options against this model (user input)
    raise UserError(f"LoRA options (--targets {o.targets!r}, --exclude {o.exclude!r}, --rank {o.rank}) "
                    f"on {model_id}: {e}") from None


def _run_length(o: OptimOptions, task: Task, batch: BatchOptions, say) -> int:
  total = o.steps or max(1, int(round(o.epochs * task.steps_per_epoch)))
  if not o.steps and total < FEW_STEPS:
    say(f"data: {total} optimizer steps ({o.epochs:g} epochs of {task.steps_per_epoch} steps at batch "
        f"{batch.batch_size * batch.grad_accum}); small data sets usually need more passes: raise --epochs "
        f"(e.g. --epochs {max(2 * int(o.epochs), int(np.ceil(FEW_STEPS * 3 / max(task.steps_per_epoch, 1))))}) or "
        "lower --batch-size, and watch eval_loss")
  return total


def setup(task: Task, model_opts: ModelOptions, lora_opts: LoraOptions, optim_opts: OptimOptions,
          batch_opts: BatchOptions, loop_opts: LoopOptions, output: OutputOptions, *, out: str, resume: bool,
          overwrite: bool, train_config: dict, say: Callable[[str], None]) -> Run:
  """Stage 1: model, data, adapters, optimizer, compiled step, output directory, resumed state.

  Raises:
    jlora.finetune.cli.UserError: bad data, model directory, targets, options that do not fit in
      memory, or a checkpoint in ``out`` written with other options (the message names the fix).
  """
  main_process = jax.process_index() == 0
  mesh = distributed.make_mesh(model_opts)
  loaded = load_model(model_opts, mesh)
  if not loaded.native:
    say(f"model: {loaded.model_type!r} is not a native jlora.models family; running transformers' Flax class"
        + (" (--pack: attention crosses example boundaries)" if getattr(task.data_options, "pack", False) else ""))
  task.prepare(TaskContext(loaded, say, process_index=jax.process_index(), process_count=jax.process_count()))

  # Native parameters were placed on the mesh while loading; legacy ones are placed now.
  base_params = loaded.params if loaded.native else distributed.place(loaded.params, model_opts, mesh)
  layout = loaded.layout
  # QLoRA (--quantize, or a *-bnb-4bit --model): the linear kernels as 4-bit NF4Weights from here on.
  base_params, quantization = quantize_lib.quantize_base(model_opts, base_params, layout, mesh,
                                                         model_id=loaded.model_id)
  loaded.params = base_params  # (no reference to a dense copy is kept)
  if quantization:
    say(f"base: linear kernels in 4 bits ({quantization['quant_type']}, blocksize {quantization['blocksize']}, "
        f"double_quant {str(quantization['double_quant']).lower()}: {quantization['bits_per_parameter']} bits "
        f"per weight; from {quantization['source']})")
  policy = VariantPolicy(lora_opts)
  lora_cfg = lora_config(lora_opts, policy, base_params, loaded)
  if lora_opts.init_adapter:  # the adapter to start from, its own targets, ranks and alphas
    path = lora_opts.init_adapter
    lora_params = distributed.place_adapters(
        adapters_lib.load(path, adapters_lib.kind(path, option="--init-adapter"), loaded, option="--init-adapter",
                          fix="Give the --model it was trained on (and --bf16 if it was trained so)."),
        base_params, mesh)
  else:
    lora_params = _init_adapters(lora_opts, batch_opts.seed, base_params, lora_cfg, layout, mesh, loaded.model_id)
  counts = jlora.count(lora_params)
  say(f"model: {loaded.model_id} | {counts}" + (f" | from {lora_opts.init_adapter}" if lora_opts.init_adapter
                                                 else ""))
  task.start(lora_params)  # e.g. the reference's log-probs, from the initial adapters
  adapters, frozen = jlora.split(lora_params)
  del lora_params

  total = _run_length(optim_opts, task, batch_opts, say)
  inner = make_optimizer(optim_opts, total)
  try:
    tx = policy.optimizer(inner, adapters, total)
  except ValueError as e:  # AdaLoRA's schedule against this run's length
    raise UserError(f"--adalora-* options with {total} steps: {e}") from None
  if output.memory_report:
    say(memory_check.report_table(loaded.forward, base_params, policy.plain(lora_cfg), layout, inner,
                                  batch=(batch_opts.batch_size, task.data_options.max_seq_len)))
  opt_state = tx.init(adapters)
  rng = jax.random.key(batch_opts.seed)
  fp = ck.fingerprint(base_params)
  run_info = {"base_model_dir": os.path.abspath(model_opts.model_dir), "lora_config": lora_cfg.to_dict(),
              "train_config": train_config, "data_fingerprint": task.fingerprint()}
  if lora_opts.init_adapter:  # (its adapters' own specs are in the metadata's "adapters")
    run_info["init_adapter"] = os.path.abspath(lora_opts.init_adapter)
  if quantization:  # how the adapter was trained; the fingerprint is the unquantized base's all the same
    run_info["base_quantization"] = quantization
  meta = ck.adapter_metadata(adapters, base_model=loaded.model_id, base_fingerprint=fp, extra=run_info)

  (adapters, opt_state), shardings = distributed.pinned((adapters, opt_state), mesh)
  step_fn = make_train_step(task.loss, tx, remat=model_opts.remat and not loaded.native,
                            use_dropout=lora_opts.lora_dropout > 0, regularizer=policy.regularizer(),
                            shardings=shardings)
  example = task.example_batch()
  compiled = memory_check.compile_and_check(
      step_fn, (adapters, opt_state, frozen, distributed.global_batch(example, mesh), rng), batch=batch_opts,
      remat=model_opts.remat, resize=lambda b: distributed.global_batch(_resized(example, b), mesh))

  # Setup succeeded: only now is the output directory touched.
  if overwrite and main_process:
    removed = rundir.clear(out)
    if removed:
      say(f"--overwrite: deleted the earlier run's {', '.join(removed)} in {out}")
  if overwrite and jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("jlora-finetune overwrite")
  ckpt = TrainCheckpointer(os.path.join(out, rundir.CHECKPOINTS), keep=loop_opts.keep_checkpoints,
                           save_every=loop_opts.save_every)
  start = 0
  if resume:
    def check(saved_meta: dict, where: str) -> None:
      conflicts = resume_conflicts(saved_meta.get("train_config") or {}, train_config)
      if conflicts:
        raise UserError(f"{where} was written by a run with other data or optimisation options: "
                        f"{'; '.join(conflicts)}. Rerun with the options it was started with, or {START_FRESH}.")
      saved_data = saved_meta.get("data_fingerprint")
      if saved_data and run_info["data_fingerprint"] and saved_data != run_info["data_fingerprint"]:
        raise UserError(f"{where} was trained on other data than --data now holds (the same options, other "
                        f"tokens: the file changed, or its tokenizer); rerun with the data it was started with, "
                        f"or {START_FRESH}.")

    restored = ckpt.restore_newest_readable(say=say, base_params=base_params, adapters_template=adapters,
                                            opt_state_template=opt_state, rng_template=rng,
                                            task_state_template=task.state(), check=check)
    if restored is not None:
      start, (adapters, opt_state, rng, _, task_state) = restored
      if task_state is not None:
        task.set_state(task_state)
      if start > total:
        raise UserError(f"{ckpt.directory}/{start} is past this run's last step ({total}); rerun with the "
                        f"--steps/--epochs it was started with, or {START_FRESH}")
      say(f"resumed from {ckpt.directory}/{start} (step {start} of {total})")
      (adapters, opt_state), _ = distributed.pinned((adapters, opt_state), mesh)
  return Run(out=out, loaded=loaded, task=task, policy=policy, base_params=base_params, adapters=adapters,
             frozen=frozen, opt_state=opt_state, rng=rng, step=compiled, mesh=mesh, start=start, total=total,
             checkpointer=ckpt, meta=meta, run_info=run_info, fingerprint=fp, counts=counts,
             quantization=quantization, main_process=main_process)


def _resized(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """A batch of the same sequences with ``rows`` rows per micro-batch (for the memory estimate only)."""
  def one(x):
    reps = -(-rows // x.shape[1])
    return np.concatenate([x] * reps, axis=1)[:, :rows]
  return {k: one(v) for k, v in batch.items()}
