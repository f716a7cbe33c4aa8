"""``TrainConfig``: every knob of the fine-tuning command, from defaults, a file and flags.

Each field carries its one-line help in its metadata; ``--help``, the
commented config file of ``--print-config`` (and ``examples/configs/all_options.toml``)
are all generated from it, so the three cannot disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jlora  # noqa: F401  (its subpackages register their init methods in _init_methods)
from jlora import _init_methods
from jlora._config import _reject_unknown_kwargs
from jlora.finetune.cli import ArgumentParser, OptionError, UserError, suggest
from jlora.finetune.metrics import REPORT_TO
from jlora.finetune.rewards import RewardSpecError, parse_reward
from jlora.finetune.options import ASSETS, DEFAULT_DATA, DEFAULT_EVAL, DEFAULT_MODEL  # noqa: F401  (re-exported)

PROG = "jlora-finetune"
TASKS = ("sft", "dpo", "simpo", "orpo", "kto", "grpo")  # the training objectives (jlora.finetune.tasks)
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # jlora.objectives.GRPO_LOSS_TYPES
# Options whose default depends on the task (unset in TrainConfig: None; ``resolved()`` fills them in).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "beta": {"grpo": 0.0, "*": 0.1},  # TRL's GRPOConfig.beta is 0; DPOConfig's, KTOConfig's, CPOConfig's 0.1
    "loss_type": {"grpo": "dapo", "*": "sigmoid"},  # TRL's GRPOConfig.loss_type; DPOConfig's
}


class _Section:
  """Makes the fields of one ``--help`` section: ``name: type = SECTION(default, "help")``.

  ``kind``: the values' type where the default does not show it: a default of None (the
  task's default, ``TASK_DEFAULTS``; or, for ``epsilon_high``, another option's value) or a
  tuple (a list option, repeatable on the command line).
  """

  def __init__(self, title: str):
    self.title = title

  def __call__(self, default: Any, help: str, kind: type | None = None, unset: str = "") -> Any:
    return dataclasses.field(default=default, metadata={"section": self.title, "help": help,
                                                        "type": kind or type(default), "unset": unset})


_DATA = _Section("model and data")
_LORA = _Section("LoRA")
_OPTIM = _Section("optimisation")
_COMPUTE = _Section("compute")
_OUTPUT = _Section("output and evaluation")
_MULTI = _Section("multi-host (see docs/scale_out.md)")
_QLORA = _Section("QLoRA: a 4-bit base (see docs/quant.md)")
_OBJECTIVE = _Section("preference tuning: --task dpo, simpo, orpo, kto (see docs/objectives.md)")
_RL = _Section("reinforcement learning: --task grpo (see docs/objectives.md)")
_MOE = _Section("mixture of experts (see docs/moe.md)")

_SCHEDULES = ("cosine", "linear", "constant")
_SHARDINGS = ("fsdp", "tp", "fsdp_tp", "replicated")
_QUANTIZE = ("none", "nf4", "fp4")
_QUANT_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes'


def _init_names() -> tuple[str, ...]:
  return tuple(n for n in _init_methods.init_method_names() if n != "adalora")  # AdaLoRA: --adalora-target-rank


def _init_known(name: str) -> bool:
  return name != "adalora" and _init_methods._lookup(name) is not None


@_reject_unknown_kwargs
@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """All options of ``jlora-finetune``; the defaults run the bundled task.

  Unknown options, wrong types and out-of-range values raise
  ``jlora.finetune.cli.OptionError`` (a ``ValueError``) naming the option.

  Example:
    >>> from jlora.finetune import TrainConfig
    >>> TrainConfig(rank=16).rank
    16
  """

  task: str = _DATA("sft", "Training objective: sft (supervised: the answers' tokens are trained, the prompts' "
                           "are not), dpo, simpo, orpo (preference pairs: prompt/chosen/rejected), kto "
                           "(prompt/completion/label) or grpo (reinforcement learning on prompt or messages "
                           "records, rewarded by --reward).")
  model: str = _DATA("", "Hugging Face causal-LM directory (config.json + safetensors): Llama, Mistral, "
                         "Qwen2/3 and Gemma 2/3 run on the native jlora.models decoder, other "
                         "architectures on transformers 4.x Flax classes; empty = the bundled tiny base.")
  data: str = _DATA("", "Training data: JSONL, JSON, Parquet, a datasets save_to_disk directory, or .txt "
                        "(several files: separated by commas, or a directory). Records: OpenAI messages, ShareGPT "
                        "conversations, "
                        "prompt/completion (or input/target), Alpaca instruction/input/output, or text "
                        "(docs/data.md); empty = the bundled word-reversal task.")
  eval_data: str = _DATA("", "Held-out data in the same format; empty = the bundled eval split with the "
                             "default data, else eval_fraction of the training data.")
  eval_fraction: float = _DATA(0.05, "Fraction of the training data held out for evaluation when no "
                                     "eval_data is given.")
  chat_template: bool = _DATA(False, "Format prompt/completion records with the tokenizer's chat template (the "
                                     "prompt as a user turn); conversations always use it.")
  train_on: str = _DATA("all", "Which assistant turns of a conversation are trained: all, or the last one.")
  skip_bad_lines: bool = _DATA(False, "Skip malformed lines and records, and examples that train no token after "
                                      "truncation (reporting how many), instead of failing on the first.")
  max_seq_len: int = _DATA(48, "Tokens per sequence; longer examples are truncated (the prompt first, from "
                               "the left).")
  pack: bool = _DATA(False, "Concatenate examples into full max_seq_len rows (no padding waste); segment "
                            "ids keep each example's attention and positions to itself.")
  show_example: int = _DATA(-1, "Print example N of --data as tokens, the trained ones marked (colour on a "
                                "terminal, [[ ]] otherwise), and exit without training; -1 = off.")

  targets: str = _LORA("all-linear", "Kernels that get adapters: all-linear (every linear layer but lm_head), "
                                     "module names (q_proj,v_proj) or a regex on '/'-joined parameter paths.")
  exclude: str = _LORA("", "Regex (fullmatch) of parameter paths never adapted.")
  rank: int = _LORA(8, "LoRA rank r (the inner size of A and B).")
  alpha: float = _LORA(16.0, "LoRA alpha: the adapter output is scaled by alpha/rank (alpha/sqrt(rank) with "
                             "rslora).")
  rslora: bool = _LORA(False, "rsLoRA scaling alpha/sqrt(rank) instead of alpha/rank.")
  lora_dropout: float = _LORA(0.0, "Dropout on the adapters' input while training, in [0, 1) (PEFT's "
                                   "lora_dropout).")
  init: str = _LORA("default", "Initialisation: default (PEFT: A kaiming-uniform, B = 0), gaussian (A ~ "
                               "N(0, 1/r^2), B = 0), pissa or pissa_niter_K (principal singular vectors, "
                               "exact or K-iteration randomized SVD), olora (QR) or loftq / loftq_N (NF4 base "
                               "+ the SVD of its error, N alternations); pissa/olora/loftq train on a "
                               "modified base and are saved as adapters of the original one.")
  dora: bool = _LORA(False, "DoRA (PEFT's use_dora): a trained magnitude per output feature times the "
                            "unit-norm direction of W0 + s*BA.")
  adalora_target_rank: int = _LORA(0, "AdaLoRA: prune the adapters' singular values to this average rank "
                                      "(--rank is the initial one); 0 = off.")
  adalora_tinit: int = _LORA(0, "AdaLoRA: warm-up steps before any pruning (PEFT's tinit).")
  adalora_tfinal: int = _LORA(0, "AdaLoRA: final steps that train with the rank pattern fixed (PEFT's "
                                 "tfinal).")
  adalora_delta_t: int = _LORA(1, "AdaLoRA: steps between two budget updates (PEFT's deltaT).")
  adalora_orth_reg: float = _LORA(0.5, "AdaLoRA: weight of the orthogonality regulariser of P and Q in the "
                                       "loss (PEFT's orth_reg_weight).")

  lr: float = _OPTIM(4e-3, "Peak learning rate (4e-3 suits the bundled tiny model; real LLMs: about 1e-4 to "
                           "5e-4).")
  schedule: str = _OPTIM("cosine", "Learning-rate schedule after warmup: cosine, linear or constant.")
  warmup_steps: int = _OPTIM(20, "Steps of linear warmup from 0 to lr.")
  weight_decay: float = _OPTIM(0.0, "AdamW weight decay on the adapters.")
  clip_norm: float = _OPTIM(1.0, "Clip the global gradient norm to this value; 0 disables clipping.")
  batch_size: int = _OPTIM(16, "Sequences per micro-batch (the compiled step's batch).")
  grad_accum: int = _OPTIM(1, "Micro-batches per optimizer step (sequences per step = batch_size * "
                              "grad_accum).")
  steps: int = _OPTIM(0, "Optimizer steps; 0 = derived from epochs.")
  epochs: float = _OPTIM(3.0, "Passes over the training data, used when steps is 0.")
  loraplus_ratio: float = _OPTIM(0.0, "LoRA+: B (and DoRA's magnitude) learn this many times faster than A "
                                      "(PEFT suggests 16); 0 = off.")

  bf16: bool = _COMPUTE(False, "Compute in bfloat16 and store the frozen base in bfloat16 (adapters stay "
                               "float32).")
  remat: bool = _COMPUTE(False, "Rematerialise each layer in the backward pass, keeping only layer inputs "
                                "(native models; others: the whole forward with "
                                "dots_with_no_batch_dims_saveable): less memory, more FLOPs.")
  seed: int = _COMPUTE(0, "Seed of the adapter initialisation, the data order and dropout.")
  reproducible: bool = _COMPUTE(True, "Pin XLA:CPU's numerics so that a run prints the same numbers on every "
                                      "x86-64 CPU model with the same number of cores: code for AVX2, no "
                                      "YNNPACK kernels (slower; GPU and TPU unaffected). Takes effect when JAX "
                                      "has not started yet, as in the command.")

  quantize: str = _QLORA("none", "Store the frozen base's linear kernels (not embeddings, norms or lm_head) in "
                                 "4 bits, bitsandbytes' format: nf4 (QLoRA), fp4, or none. A pre-quantized "
                                 "*-bnb-4bit --model trains in 4 bits as it is.")
  double_quant: bool = _QLORA(True, "With --quantize: quantize the block scales too (QLoRA's double "
                                    "quantization: 4.127 instead of 4.5 bits per weight).")
  quant_blocksize: int = _QLORA(64, "With --quantize: weights per 4-bit scale block, a power of two in "
                                    "32..4096 (QLoRA: 64).")

  beta: float | None = _OBJECTIVE(None, "The objective's beta: DPO's and KTO's inverse temperature, SimPO's reward "
                                       "scale, ORPO's weight of the odds-ratio term (TRL's SimPO recipe: 2.5); "
                                       "GRPO's weight of the KL to the base (0: no reference pass). Unset: TRL's "
                                       "default for the task.", float)
  loss_type: str | None = _OBJECTIVE(None, "The loss: DPO's sigmoid, ipo, hinge or robust; GRPO's grpo, bnpo, "
                                           "dr_grpo or dapo (TRL's names). Unset: TRL's default for the task.", str)
  label_smoothing: float = _OBJECTIVE(0.0, "DPO robust: the assumed share of flipped preferences, in [0, 0.5).")
  simpo_gamma: float = _OBJECTIVE(0.5, "SimPO's target reward margin gamma (TRL's SimPO recipe: 1.375).")
  cpo_alpha: float = _OBJECTIVE(0.0, "SimPO: weight of an NLL term on the chosen answers (TRL's CPO default: "
                                     "1.0; 0 = pure SimPO).")
  kto_desirable_weight: float = _OBJECTIVE(1.0, "KTO: weight of the desirable examples' loss.")
  kto_undesirable_weight: float = _OBJECTIVE(1.0, "KTO: weight of the undesirable examples' loss.")
  init_adapter: str = _OBJECTIVE("", "Start from this adapter (a jlora adapter/ or PEFT peft/ directory, e.g. of "
                                     "an SFT run) instead of fresh adapters; its targets, ranks and alphas are "
                                     "kept.")
  reference: str = _OBJECTIVE("base", "The reference of dpo and kto: base (the model with the adapters off: no "
                                      "second copy of the weights) or init (the --init-adapter, frozen).")
  precompute_reference: bool = _OBJECTIVE(False, "Compute the reference log-probabilities once, in one pass over "
                                                 "the data before training (always so with --reference init).")
  logits_chunk: int = _OBJECTIVE(1024, "Positions per block of output-layer logits in the losses (the "
                                       "[batch, tokens, vocab] logits are never materialised on the native "
                                       "decoder).")

  router_aux_loss_coef: float | None = _MOE(
      None, "--task sft on a mixture of experts: weight of the load-balancing loss (transformers' "
            "router_aux_loss_coef) added to the training loss. Unset: config.json's router_aux_loss_coef when "
            "a router is trained (named in --targets), else off; a value > 0 adds it even with the routers "
            "frozen (the loss still reaches the adapters that feed them); 0 = off.", float,
      unset="config.json's when a router trains")

  num_generations: int = _RL(8, "Completions sampled per prompt (a group), at least 2. --batch-size counts "
                                "completions, as TRL's per_device_train_batch_size: each step generates "
                                "batch_size * grad_accum of them, a multiple of num_generations.")
  reward: tuple[str, ...] = _RL(("exact_match",), "Reward functions, summed with their weights: NAME[:WEIGHT], "
                                                  "repeatable (a TOML list; or one string, split at commas). Built in: "
                                                  "exact_match (the completion, stripped, equals the record's "
                                                  "answer or completion field), contains (holds it), "
                                                  "regex:PATTERN (1 if re.search finds it: a format reward), "
                                                  "length:BUDGET (0 up to BUDGET tokens, then down to -1 at "
                                                  "--max-completion-length); yours: module:function or "
                                                  "file.py:function, called as TRL's, (prompts, completions, "
                                                  "completion_ids, **the record's other fields) -> list[float].",
                                tuple)
  scale_rewards: str = _RL("group", "Advantages: the reward minus its group's mean, divided by the std of the "
                                    "group (group), of the whole batch (batch), or not divided (none: Dr. GRPO).")
  num_iterations: int = _RL(1, "Optimizer steps on each rollout batch (TRL's num_iterations, PPO's epochs "
                               "mu); above 1 the rollout's log-probs are kept and the ratio is clipped.")
  epsilon: float = _RL(0.2, "Clipping range of the importance ratio: [1 - epsilon, 1 + epsilon_high].")
  epsilon_high: float | None = _RL(None, "Upper clipping range (DAPO's clip-higher, e.g. 0.28).", float,
                                   unset="--epsilon's value")
  importance_sampling_level: str = _RL("token", "Importance ratio per token, or per sequence (the mean of its "
                                                "tokens' log-ratios: GSPO).")
  dynamic_sampling: bool = _RL(False, "Drop the groups whose rewards are all equal (they carry no advantage) "
                                      "from the loss, and log how many (dropped_groups).")
  max_completion_length: int = _RL(16, "Longest completion, in tokens (TRL's max_completion_length, 512 by "
                                       "default; the bundled task's answers need a few).")
  temperature: float = _RL(1.0, "Sampling temperature of the rollouts; the loss divides the logits by it "
                                "too, as TRL's.")
  top_p: float = _RL(1.0, "Nucleus sampling: keep the most likely tokens up to this probability mass (1 = off).")
  top_k: int = _RL(0, "Keep only the top_k most likely tokens when sampling (0 = off).")
  stop: tuple[str, ...] = _RL((), "Stop strings: a completion ends with the token that completes one in its "
                                  "text (kept in it, as Hugging Face keeps it); repeatable (a TOML list; or "
                                  "one string, split at commas). The tokenizer's EOS always ends a completion.", tuple)

  output_dir: str = _OUTPUT("runs/default", "Directory for checkpoints, the adapter (jlora and PEFT format), "
                                            "metrics and the summary.")
  log_every: int = _OUTPUT(10, "Log loss, gradient norm and tokens/s every this many steps.")
  eval_every: int = _OUTPUT(100, "Compute the eval loss every this many steps (and after the last).")
  save_every: int = _OUTPUT(100, "Write a resumable checkpoint every this many steps (and after the last).")
  keep_checkpoints: int = _OUTPUT(2, "Checkpoints kept in output_dir/checkpoints (older ones are deleted).")
  eval_exact_match: int = _OUTPUT(0, "Eval examples scored by exact match of greedy generations before and "
                                     "after training (0 = all, -1 = none).")
  max_new_tokens: int = _OUTPUT(16, "Longest generation when scoring exact match.")
  save_merged: bool = _OUTPUT(False, "Also write the merged model as a Hugging Face directory "
                                     "(output_dir/merged, safetensors loadable by transformers).")
  progress: bool = _OUTPUT(True, "Show a progress bar (without it, each logged step prints a line).")
  report_to: str = _OUTPUT("none", "Also send the logged metrics to: tensorboard (event files in "
                                   "output_dir/tensorboard), wandb (Weights & Biases; WANDB_* variables apply), "
                                   "both (tensorboard,wandb), or none. metrics.jsonl is always written.")
  memory_report: bool = _OUTPUT(False, "Before training, print this run's train-step memory by category "
                                       "(frozen and trained weights, gradients, optimizer state, "
                                       "activations) for full fine-tuning, LoRA, DoRA and QLoRA, from XLA's "
                                       "compile-time analysis.")

  coordinator: str = _MULTI("", "Coordinator host:port for jax.distributed.initialize, or auto (Cloud TPU, "
                                "SLURM, MPI, JAX_COORDINATOR_ADDRESS); empty = one process unless the "
                                "environment is multi-host.")
  num_processes: int = _MULTI(1, "Number of processes (with an explicit coordinator).")
  process_id: int = _MULTI(0, "This process's index in [0, num_processes) (with an explicit coordinator).")
  mesh: str = _MULTI("", "Mesh shape such as data=2,fsdp=4,tensor=1; empty = all devices on the data axis.")
  sharding: str = _MULTI("fsdp", "Base-model sharding preset: fsdp, tp, fsdp_tp or replicated.")

  def __post_init__(self):
    for f in dataclasses.fields(self):
      want, value = f.metadata["type"], getattr(self, f.name)
      if value is None and f.default is None:  # unset: the task's default (TASK_DEFAULTS)
        continue
      if want is tuple:  # a list option: a list, or one comma-separated string
        object.__setattr__(self, f.name, _as_tuple(f.name, value))
        continue
      _check_type(f.name, value, want)
      if want is float:  # an int where a float is expected (lr = 1 in a TOML file)
        object.__setattr__(self, f.name, float(value))

    def positive(name, allow_zero=False):
      v = getattr(self, name)
      if v < 0 or (v == 0 and not allow_zero):
        raise OptionError(name, f"must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")

    for name in ("max_seq_len", "rank", "batch_size", "grad_accum", "log_every", "eval_every",
                 "save_every", "keep_checkpoints", "max_new_tokens", "lr", "alpha", "num_processes"):
      positive(name)
    for name in ("steps", "warmup_steps", "weight_decay", "clip_norm", "epochs", "seed", "process_id"):
      positive(name, allow_zero=True)
    if self.steps == 0 and self.epochs == 0:
      raise OptionError("steps", "must be > 0 when epochs is 0: set steps or epochs")
    for name in ("adalora_target_rank", "adalora_tinit", "adalora_tfinal", "loraplus_ratio", "adalora_orth_reg"):
      positive(name, allow_zero=True)
    positive("adalora_delta_t")
    if self.adalora_target_rank:
      if self.adalora_target_rank >= self.rank:
        raise OptionError("adalora_target_rank", f"must be < rank ({self.rank}), the initial rank that AdaLoRA "
                                                 f"prunes from; got {self.adalora_target_rank}")
      if self.dora or self.init not in ("default", "gaussian"):
        raise OptionError("adalora_target_rank", "AdaLoRA has its own adapters and init: it does not combine "
                                                 "with --dora or --init " + self.init)
    if not _init_known(self.init):
      raise OptionError("init", f"must be one of {', '.join(_init_names())}; got {self.init!r}")
    for name, allowed in (("schedule", _SCHEDULES), ("sharding", _SHARDINGS), ("task", TASKS),
                          ("train_on", ("all", "last")), ("reference", ("base", "init")),
                          ("scale_rewards", ("group", "batch", "none")),
                          ("importance_sampling_level", ("token", "sequence"))):
      if getattr(self, name) not in allowed:
        raise OptionError(name, f"must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
    loss_types = {"dpo": DPO_LOSS_TYPES, "grpo": GRPO_LOSS_TYPES}.get(self.task, DPO_LOSS_TYPES + GRPO_LOSS_TYPES)
    if self.loss_type is not None and self.loss_type not in loss_types:
      raise OptionError("loss_type", f"must be one of {', '.join(loss_types)} with --task {self.task}; got "
                                     f"{self.loss_type!r}")
    if self.quantize not in _QUANTIZE:
      raise OptionError("quantize", f"must be one of {', '.join(_QUANTIZE)}; got {self.quantize!r}")
    if self.quantize != "none" and self.init.startswith("loftq"):
      raise OptionError("init", f"{self.init} quantizes the base itself (to NF4, fitting the adapters to the "
                                "quantization error): drop --quantize")
    if self.quant_blocksize not in _QUANT_BLOCKSIZES:
      raise OptionError("quant_blocksize", f"must be a power of two in 32..4096, got {self.quant_blocksize}")
    if not 0.0 < self.eval_fraction < 1.0:
      raise OptionError("eval_fraction", f"must be in (0, 1), got {self.eval_fraction!r}")
    if not 0.0 <= self.lora_dropout < 1.0:
      raise OptionError("lora_dropout", f"must be in [0, 1), got {self.lora_dropout!r}")
    for name in ("logits_chunk", "kto_desirable_weight", "kto_undesirable_weight"):
      positive(name)
    if self.beta is not None:
      positive("beta", allow_zero=self.task == "grpo")
    positive("simpo_gamma", allow_zero=True)
    if self.router_aux_loss_coef is not None:
      positive("router_aux_loss_coef", allow_zero=True)
      if self.router_aux_loss_coef > 0 and self.task != "sft":
        raise OptionError("router_aux_loss_coef", f"applies to --task sft only; got --task {self.task}")
    positive("cpo_alpha", allow_zero=True)
    if not 0.0 <= self.label_smoothing < 0.5:
      raise OptionError("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing!r}")
    loss_type = self.task_default("loss_type")
    if self.label_smoothing and loss_type != "robust":
      raise OptionError("label_smoothing", f"applies to --loss-type robust only (TRL's sigmoid has none); got "
                                           f"--loss-type {loss_type}")
    self._check_rl()
    if self.init_adapter and (self.dora or self.init != "default" or self.adalora_target_rank):
      raise OptionError("init_adapter", "continues that adapter as it is (its variant, targets, ranks and alphas): "
                                        "drop --dora, --init and --adalora-target-rank")
    if self.reference == "init" and not self.init_adapter:
      raise OptionError("reference", "init needs --init-adapter (the adapter to keep frozen as the reference)")
    if self.show_example < -1:
      raise OptionError("show_example", f"must be >= 0 (an example's index), or -1 for off; got {self.show_example}")
    if self.eval_exact_match < -1:
      raise OptionError("eval_exact_match", f"must be >= -1 (0 = all, -1 = none), got {self.eval_exact_match}")
    if self.process_id >= self.num_processes:
      raise OptionError("process_id", f"must be < num_processes ({self.num_processes}), got {self.process_id}")
    bad = [r for r in self.report_to.split(",") if r not in (*REPORT_TO, "none")] if self.report_to else ["''"]
    if bad:
      raise OptionError("report_to", f"must be none or a comma-separated list of {', '.join(REPORT_TO)}; got "
                                     f"{self.report_to!r}")
    if not self.output_dir:
      raise OptionError("output_dir", "must not be empty")
    if not self.targets:
      raise OptionError("targets", "must not be empty: use all-linear, module names or a regex")
    for name in ("targets", "exclude"):
      try:
        re.compile(getattr(self, name))
      except re.error as e:
        raise OptionError(name, f"is not a valid regex ({e}): {getattr(self, name)!r}") from None

  def _check_rl(self) -> None:
    """The reinforcement-learning options (--task grpo reads them; they are checked for any task)."""
    for name in ("num_generations", "num_iterations", "max_completion_length", "epsilon", "temperature"):
      if getattr(self, name) <= 0:
        raise OptionError(name, f"must be > 0, got {getattr(self, name)!r}")
    if self.num_generations < 2:
      raise OptionError("num_generations", f"must be >= 2 (a group's rewards are compared with each other), got "
                                           f"{self.num_generations}")
    if self.epsilon_high is not None and self.epsilon_high <= 0:
      raise OptionError("epsilon_high", f"must be > 0 (or unset: --epsilon), got {self.epsilon_high!r}")
    if not 0.0 < self.top_p <= 1.0:
      raise OptionError("top_p", f"must be in (0, 1], got {self.top_p!r}")
    if self.top_k < 0:
      raise OptionError("top_k", f"must be >= 0 (0 = off), got {self.top_k}")
    if any(not s for s in self.stop):
      raise OptionError("stop", "must not hold an empty string")
    if self.task == "grpo" and not self.reward:
      raise OptionError("reward", "must name at least one reward function with --task grpo, e.g. exact_match")
    for spec in self.reward:
      try:
        parse_reward(spec)
      except RewardSpecError as e:
        raise OptionError("reward", str(e)) from None
    if self.task == "grpo" and (self.batch_size * self.grad_accum) % self.num_generations:
      raise OptionError("num_generations", f"must divide the completions of a step, batch_size * grad_accum = "
                                           f"{self.batch_size} * {self.grad_accum}; got {self.num_generations}")

  def task_default(self, name: str) -> Any:
    """Option ``name``'s value, or, unset, its default for this task (``TASK_DEFAULTS``).

    Example:
      >>> from jlora.finetune import TrainConfig
      >>> TrainConfig(task="grpo").task_default("beta"), TrainConfig(task="dpo").task_default("beta")
      (0.0, 0.1)
    """
    value = getattr(self, name)
    if value is not None or name not in TASK_DEFAULTS:
      return value
    defaults = TASK_DEFAULTS[name]
    return defaults.get(self.task, defaults["*"])

  def resolved(self) -> TrainConfig:
    """This config with every unset option set to its task's default (what a run reads and records).

    Example:
      >>> from jlora.finetune import TrainConfig
      >>> cfg = TrainConfig(task="grpo").resolved()
      >>> cfg.beta, cfg.loss_type
      (0.0, 'dapo')
    """
    return dataclasses.replace(self, **{name: self.task_default(name) for name in TASK_DEFAULTS})

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# Options a resumed run may change: how it runs, logs, evaluates by generation and where it writes,
# never what it trains on or how it optimises. Every other option must equal the checkpoint's
# (``resume_conflicts``). The base itself is checked by its weights' fingerprint, not its path.
RESUME_MAY_DIFFER = frozenset({
    "model",  # the same weights may live elsewhere now (fingerprint-checked)
    "remat", "mesh", "sharding", "coordinator", "num_processes", "process_id", "reproducible",
    "log_every", "eval_every", "save_every", "keep_checkpoints", "progress", "memory_report", "report_to",
    "eval_exact_match", "max_new_tokens", "save_merged", "output_dir", "show_example",
    "logits_chunk", "precompute_reference",  # (how the same numbers are computed)
})


def resume_conflicts(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """The options that change a run's result and differ from those a checkpoint was written with.

  Args:
    saved: the checkpoint's ``train_config`` (``TrainConfig.to_dict()`` of the run that wrote it).
    current: this run's, likewise.

  Returns:
    One ``"--flag OLD (now NEW)"`` per differing option, in ``--help`` order; empty when
    the run may continue. Options a newer jlora added (absent from ``saved``) count as their
    default.

  Example:
    >>> from jlora.finetune.config import TrainConfig, resume_conflicts
    >>> saved = TrainConfig(epochs=5, log_every=1).to_dict()
    >>> resume_conflicts(saved, TrainConfig(epochs=10, log_every=50).to_dict())
    ['--epochs 5.0 (now 10.0)']
  """
  out = []
  for name, f in _fields().items():
    if name in RESUME_MAY_DIFFER:
      continue
    old, new = saved.get(name, f.default), current.get(name, f.default)
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):  # a list option (JSON keeps lists)
      old, new = tuple(old), tuple(new)
    if old != new:
      out.append(f"{_flag(name)} {_shown(old)} (now {_shown(new)})")
  return out


def _shown(v: Any) -> str:
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, str):
    return repr(v) if v else "'' (the default)"
  if v is None:
    return "unset (the task's default)"
  if isinstance(v, (list, tuple)):
    return repr(",".join(v)) if v else "'' (none)"
  return str(v)


def _as_tuple(name: str, value: Any) -> tuple[str, ...]:
  """A list option's value: a list or tuple of strings, or one string of comma-separated entries."""
  if isinstance(value, str):
    return tuple(v.strip() for v in value.split(",") if v.strip())
  if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
    return tuple(value)
  raise OptionError(name, f"must be a list of strings (or one comma-separated string), got "
                          f"{type(value).__name__} {value!r}")


def _check_type(name: str, value: Any, want: type) -> None:
  ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
  if want is float and isinstance(value, int) and not isinstance(value, bool):
    ok = True
  if not ok:
    raise OptionError(name, f"must be {_TYPE_WORDS[want]}, got {type(value).__name__} {value!r}")


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}

# Names other trainers (transformers' TrainingArguments, PEFT, axolotl) use for these options.
ALIASES = {
    "learning_rate": "lr", "lr_scheduler_type": "schedule", "lr_schedule": "schedule", "scheduler": "schedule",
    "r": "rank", "lora_r": "rank", "lora_rank": "rank", "lora_alpha": "alpha", "use_rslora": "rslora",
    "dropout": "lora_dropout", "target_modules": "targets", "exclude_modules": "exclude",
    "init_lora_weights": "init", "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
    "micro_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "gradient_accumulation": "grad_accum", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "max_steps": "steps", "num_steps": "steps", "train_steps": "steps", "warmup": "warmup_steps",
    "max_grad_norm": "clip_norm", "grad_clip": "clip_norm", "gradient_clipping": "clip_norm",
    "model_name_or_path": "model", "base_model": "model", "model_path": "model", "model_dir": "model",
    "dataset": "data", "train_file": "data", "train_data": "data", "data_path": "data",
    "eval_file": "eval_data", "validation_file": "eval_data", "max_length": "max_seq_len",
    "max_seq_length": "max_seq_len", "seq_len": "max_seq_len", "sequence_len": "max_seq_len",
    "cutoff_len": "max_seq_len", "packing": "pack", "sample_packing": "pack", "gradient_checkpointing": "remat",
    "activation_checkpointing": "remat", "bfloat16": "bf16", "output": "output_dir", "out_dir": "output_dir",
    "logging_steps": "log_every", "eval_steps": "eval_every", "save_steps": "save_every",
    "save_total_limit": "keep_checkpoints",
}


def _fields() -> dict[str, dataclasses.Field]:
  return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def option_help(name: str) -> str:
  """The one-line help of a ``TrainConfig`` field (what ``--help`` shows).

  Example:
    >>> from jlora.finetune.config import option_help
    >>> option_help("rank")
    'LoRA rank r (the inner size of A and B).'
  """
  return _fields()[name].metadata["help"]


def _toml_value(v: Any) -> str:
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, str):
    return json.dumps(v)
  if isinstance(v, (list, tuple)):
    return json.dumps(list(v))
  return repr(v)


def _default_text(name: str) -> str:
  """How --help and errors show a default (an unset one: each task's)."""
  f = _fields()[name]
  if f.default is not None:
    return _toml_value(f.default)
  if name in TASK_DEFAULTS:
    d = TASK_DEFAULTS[name]
    return "; ".join([f"{_toml_value(v)} for {t}" for t, v in d.items() if t != "*"] +
                     [f"{_toml_value(d['*'])} otherwise"])
  return f.metadata["unset"]


def config_template(cfg: TrainConfig | None = None) -> str:
  """``cfg`` (default: the defaults) as a ``.toml`` config file with every option's help as a comment.

  ``jlora-finetune --print-config`` prints it; ``--config`` reads it back.

  Example:
    >>> from jlora.finetune.config import config_template
    >>> print(config_template().split("\\nrank = 8")[0].splitlines()[-1])
    # LoRA rank r (the inner size of A and B).
  """
  import textwrap

  cfg = cfg or TrainConfig()
  lines = ["# jlora-finetune options (jlora-finetune --config FILE; flags override the file).",
           "# Generated from the TrainConfig field help: jlora-finetune --print-config"]
  section = None
  for name, f in _fields().items():
    if f.metadata["section"] != section:
      section = f.metadata["section"]
      lines += ["", f"# -- {section} --"]
    lines += textwrap.wrap(f.metadata["help"], 100, initial_indent="# ", subsequent_indent="# ")
    value = getattr(cfg, name)
    if value is None:  # unset: TOML has no null, so the key stays out (default: {_default_text})
      lines.append(f"# {name} =   (unset: {_default_text(name)})")
    else:
      lines.append(f"{name} = {_toml_value(value)}")
  return "\n".join(lines) + "\n"


def load_config_file(path: str) -> dict[str, Any]:
  """Reads a ``.json`` or ``.toml`` config file into a dict of TrainConfig fields.

  Raises:
    UserError: the file is missing, unreadable, not a table of options, or has
      an unknown key (the message names the file and the closest known key).
  """
  if not os.path.isfile(path):
    raise UserError(f"--config {path!r}: no such file")
  if not path.endswith((".toml", ".json")):
    raise UserError(f"--config {path!r}: use a .toml or .json file")
  with open(path, "rb") as f:
    try:
      if path.endswith(".toml"):
        import tomllib

        data = tomllib.load(f)
      else:
        data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # tomllib.TOMLDecodeError, json.JSONDecodeError
      raise UserError(f"--config {path}: not valid {path.rsplit('.', 1)[1].upper()}: {e}") from None
  if not isinstance(data, Mapping):
    raise UserError(f"--config {path}: must hold a table/object of options, got {type(data).__name__}")
  fields = _fields()
  out = {}
  for key, value in data.items():
    name = key.replace("-", "_")
    if name not in fields:
      near = suggest(name, list(fields), ALIASES)
      nested = " (options are top-level keys, not tables)" if isinstance(value, Mapping) else ""
      raise UserError(f"{path}: unknown option {key!r}{nested}"
                      + (f"; did you mean {near!r}?" if near else "")
                      + f" All options: {PROG} --help.")
    out[name] = value
  return out


def build_parser() -> argparse.ArgumentParser:
  """The ``jlora-finetune`` argument parser; each option's help is its ``TrainConfig`` field help."""
  fields = _fields()
  p = ArgumentParser(
      prog=PROG, usage=f"{PROG} [--config FILE] [--OPTION VALUE ...]",
      description="Fine-tune a causal LM with LoRA (jlora). With no arguments: the bundled tiny model on the "
                  "bundled word-reversal task, offline. Every option can also be set in a --config file "
                  "(the key is the option name without the dashes).",
      suggest_flag=lambda flag: _flag(n) if (n := suggest(flag, list(fields), ALIASES)) else None)
  run = p.add_argument_group("run")
  run.add_argument("--config", metavar="FILE", help="A .toml or .json file of options; flags override it.")
  run.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="Resume from the newest readable checkpoint in output_dir if there is one "
                        "(default: true). --no-resume refuses an output_dir that holds checkpoints.")
  run.add_argument("--overwrite", action="store_true",
                   help="Start fresh in an output_dir that holds an earlier run: its checkpoints, adapters, "
                        "metrics and summary are deleted once this run's model and data have loaded (other "
                        "files are kept).")
  run.add_argument("--print-config", action="store_true",
                   help="Print the options (defaults < --config < flags) as a commented .toml file and exit.")
  groups: dict[str, Any] = {}
  for name, f in fields.items():
    section = f.metadata["section"]
    group = groups.get(section) or groups.setdefault(section, p.add_argument_group(section))
    help_text = f"{f.metadata['help']} (default: {_default_text(name)})"
    typ = f.metadata["type"]
    if typ is bool:
      group.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                         help=help_text)
    elif typ is tuple:  # repeatable: each flag one entry (never split at commas)
      group.add_argument(_flag(name), dest=name, action="append", default=None, metavar=name.upper(),
                         help=help_text)
    else:
      group.add_argument(_flag(name), dest=name, type=typ, default=None, metavar=name.upper(), help=help_text)
  return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
  """Defaults < config file < command-line flags.

  Raises:
    UserError: a bad config file or option value; the message names the flag or
      the file and key the value came from.

  Example:
    >>> from jlora.finetune.config import parse_args
    >>> cfg, ns = parse_args(["--rank", "4", "--no-resume"])
    >>> cfg.rank, ns.resume
    (4, False)
  """
  ns = build_parser().parse_args(argv)
  values: dict[str, Any] = {}
  where: dict[str, str] = {}
  if ns.config:
    for name, v in load_config_file(ns.config).items():
      values[name], where[name] = v, f"{ns.config}: {name}"
  for name in _fields():
    v = getattr(ns, name)
    if v is not None:
      values[name], where[name] = v, _flag(name)
  if ns.overwrite and ns.resume:
    raise UserError("--overwrite starts fresh, --resume continues: give one of them")
  ns.resume = not ns.overwrite if ns.resume is None else ns.resume
  try:
    return TrainConfig(**values), ns
  except OptionError as e:
    default = _default_text(e.option)
    raise UserError(f"{where.get(e.option, _flag(e.option))} {e.problem}. {_flag(e.option)}: "
                    f"{option_help(e.option)} Default: {default}.") from None
