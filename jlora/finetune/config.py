"""``TrainConfig``: every knob of the fine-tuning command, from defaults, a file and flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from jlora._config import _reject_unknown_kwargs

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DEFAULT_MODEL = os.path.join(ASSETS, "tiny-base")
DEFAULT_DATA = os.path.join(ASSETS, "data", "reverse_words.train.jsonl")
DEFAULT_EVAL = os.path.join(ASSETS, "data", "reverse_words.eval.jsonl")


@_reject_unknown_kwargs
@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """All options of ``python -m jlora.finetune``; the defaults run the bundled task.

  Example:
    >>> from jlora.finetune import TrainConfig
    >>> TrainConfig(rank=16).rank
    16
  """

  # -- model and data --
  # Hugging Face model directory (config.json + safetensors; Llama, Mistral, Qwen2/3 and Gemma
  # run on jlora.models, other architectures on transformers 4.x Flax classes);
  # empty = the bundled tiny base model.
  model: str = ""
  # Training data: JSONL (prompt/completion, input/target, instruction/output, text) or .txt.
  data: str = ""
  # Held-out data; empty = the bundled eval split (default data) or eval_fraction of data.
  eval_data: str = ""
  # Fraction of `data` held out for evaluation when no eval_data is given.
  eval_fraction: float = 0.05
  # Format prompts with the tokenizer's chat template (needs a tokenizer that has one).
  chat_template: bool = False
  # Skip malformed JSONL lines (reporting how many) instead of failing on the first.
  skip_bad_lines: bool = False
  # Tokens per sequence; longer examples are truncated (prompt first, from the left).
  max_seq_len: int = 48
  # Concatenate examples into full max_seq_len rows (no padding waste); segment ids keep each
  # example's attention and positions to itself.
  pack: bool = False
  # -- LoRA --
  # "all-linear", comma-separated module names ("q_proj,v_proj"), or a regex on parameter paths.
  targets: str = "all-linear"
  # Regex of parameter paths never adapted.
  exclude: str = ""
  rank: int = 8
  alpha: float = 16.0
  rslora: bool = False
  lora_dropout: float = 0.0
  # "default" (PEFT: A kaiming-uniform, B = 0) or "gaussian".
  init: str = "default"
  # -- optimisation --
  # Peak learning rate (4e-3 suits the bundled tiny model; real LLMs: ~1e-4 to 5e-4).
  lr: float = 4e-3
  # "cosine", "linear" or "constant" after warmup.
  schedule: str = "cosine"
  warmup_steps: int = 20
  # AdamW weight decay on the adapters.
  weight_decay: float = 0.0
  # Global gradient-norm clipping; 0 disables.
  clip_norm: float = 1.0
  # Sequences per optimizer step = batch_size * grad_accum.
  batch_size: int = 16
  grad_accum: int = 1
  # Optimizer steps; 0 = derived from epochs.
  steps: int = 0
  epochs: float = 3.0
  # -- compute --
  # Compute in bfloat16 and store the frozen base in bfloat16 (adapters stay float32).
  bf16: bool = False
  # Rematerialise each layer in the backward pass, keeping only layer inputs (native models;
  # others: the whole forward with dots_with_no_batch_dims_saveable): less memory, more FLOPs.
  remat: bool = False
  seed: int = 0
  # -- bookkeeping --
  output_dir: str = "runs/default"
  log_every: int = 10
  eval_every: int = 100
  save_every: int = 100
  keep_checkpoints: int = 2
  # Examples of the eval set scored by exact match of greedy generations (0 = all, -1 = none).
  eval_exact_match: int = 0
  max_new_tokens: int = 16
  # Also write the merged model as a Hugging Face directory (output_dir/merged).
  save_merged: bool = False
  # Show a progress bar.
  progress: bool = True
  # -- multi-host (see docs/scale_out.md) --
  # Coordinator "host:port" for jax.distributed.initialize, or "auto" (Cloud TPU, SLURM, MPI,
  # JAX_COORDINATOR_ADDRESS); empty = single process unless the environment is multi-host.
  coordinator: str = ""
  num_processes: int = 1
  process_id: int = 0
  # Mesh shape as "data=2,fsdp=4,tensor=1"; empty = all devices on the data axis.
  mesh: str = ""
  # Base-model sharding preset: "fsdp", "tp", "fsdp_tp" or "replicated".
  sharding: str = "fsdp"

  def __post_init__(self):
    def positive(name, allow_zero=False):
      v = getattr(self, name)
      if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"TrainConfig.{name} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}.")

    for name in ("max_seq_len", "rank", "batch_size", "grad_accum", "log_every", "eval_every",
                 "save_every", "keep_checkpoints", "max_new_tokens", "lr", "alpha", "num_processes"):
      positive(name)
    for name in ("steps", "warmup_steps", "weight_decay", "clip_norm", "epochs"):
      positive(name, allow_zero=True)
    if self.steps == 0 and self.epochs == 0:
      raise ValueError("TrainConfig: set steps > 0 or epochs > 0.")
    if self.schedule not in ("cosine", "linear", "constant"):
      raise ValueError(f"TrainConfig.schedule must be 'cosine', 'linear' or 'constant', got {self.schedule!r}.")
    if not 0.0 < self.eval_fraction < 1.0:
      raise ValueError(f"TrainConfig.eval_fraction must be in (0, 1), got {self.eval_fraction!r}.")
    if self.sharding not in ("fsdp", "tp", "fsdp_tp", "replicated"):
      raise ValueError(f"TrainConfig.sharding must be fsdp, tp, fsdp_tp or replicated, got {self.sharding!r}.")

  @property
  def model_dir(self) -> str:
    return self.model or DEFAULT_MODEL

  @property
  def data_path(self) -> str:
    return self.data or DEFAULT_DATA

  @property
  def eval_path(self) -> str:
    if self.eval_data:
      return self.eval_data
    return DEFAULT_EVAL if not self.data else ""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _field_types() -> dict[str, type]:
  out = {}
  for f in dataclasses.fields(TrainConfig):
    default = f.default
    out[f.name] = type(default)
  return out


def load_config_file(path: str) -> dict[str, Any]:
  """Reads a ``.json`` or ``.toml`` config file into a dict of TrainConfig fields."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  with open(path, "rb") as f:
    if path.endswith(".toml"):
      import tomllib

      data = tomllib.load(f)
    elif path.endswith(".json"):
      data = json.load(f)
    else:
      raise ValueError(f"config file {path!r}: use a .json or .toml file")
  if not isinstance(data, Mapping):
    raise ValueError(f"config file {path!r} must hold a table/object of options")
  return {k.replace("-", "_"): v for k, v in data.items()}


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m jlora.finetune",
      description="Fine-tune a causal LM with LoRA (jlora). With no arguments: the bundled "
                  "tiny model on the bundled word-reversal task, offline.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--config", help="a .toml or .json file of options (flags override it)")
  p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                 help="resume from the latest checkpoint in output_dir if there is one")
  defaults = TrainConfig()
  for name, typ in _field_types().items():
    flag = "--" + name.replace("_", "-")
    default = getattr(defaults, name)
    if typ is bool:
      p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                     help=f"(default: {default})")
    else:
      p.add_argument(flag, dest=name, type=typ, default=None, help=f"(default: {default!r})")
  return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
  """Defaults < config file < command-line flags."""
  ns = build_parser().parse_args(argv)
  values: dict[str, Any] = {}
  if ns.config:
    values.update(load_config_file(ns.config))
  for name in _field_types():
    v = getattr(ns, name)
    if v is not None:
      values[name] = v
  types = _field_types()
  for k, v in list(values.items()):
    if k in types and types[k] is float and isinstance(v, int) and not isinstance(v, bool):
      values[k] = float(v)
  return TrainConfig(**values), ns
