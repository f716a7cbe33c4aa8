"""What ``python -m jlora.memory`` computes: model shapes (preset or HF config), reports, plot."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jlora._config import LoraConfig, Rule
from jlora.memory import _gpt
from jlora.memory._compare import compare
from jlora.memory._report import CATEGORIES, MemoryReport, format_table

PRESETS = _gpt.PRESETS


def _targets(spec: str) -> str:
  if re.fullmatch(r"[A-Za-z0-9_]+(,[A-Za-z0-9_]+)*", spec):
    return rf".*/({'|'.join(spec.split(','))})/kernel"
  return spec


def preset_model(name: str, args) -> dict[str, Any]:
  cfg = PRESETS[name]
  if args.dtype:
    cfg = dataclasses.replace(cfg, dtype=args.dtype)
  seq = args.seq or cfg.context
  if seq > cfg.context:
    raise ValueError(f"--seq {seq} exceeds the model's context {cfg.context}")
  params = _gpt.param_shapes(cfg)
  lay = _gpt.layouts(params)
  targets = _targets(args.targets or "query,value")
  rule = Rule(pattern=targets)
  return {"loss": _gpt.loss_fn(cfg), "params": params, "layout": lay, "targets": rule,
          "batch": jax.ShapeDtypeStruct((args.batch, seq), jnp.int32),
          "quantize_targets": r"layers/(attn|mlp)/\w+/kernel", "name": name}


def hf_model(directory: str, args) -> dict[str, Any]:
  """Shapes of a transformers Flax causal LM from its config.json alone (no weights read)."""
  if not os.path.isfile(os.path.join(directory, "config.json")):
    raise FileNotFoundError(f"--model {directory!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a "
                            "directory with a config.json")
  from jlora.finetune.model import _quiet_transformers

  _quiet_transformers()
  import transformers

  config = transformers.AutoConfig.from_pretrained(directory)
  dtype = jnp.dtype(args.dtype or "float32")
  model = transformers.FlaxAutoModelForCausalLM.from_config(config, _do_init=False, dtype=dtype)
  seq = args.seq or 512
  ids = jax.ShapeDtypeStruct((args.batch, seq), jnp.int32)
  params = jax.eval_shape(lambda k: model.init_weights(k, (1, 8)), jax.random.key(0))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating)
                                                       else x.dtype), params)

  def forward(p, ids):
    return model(ids, params=p).logits

  def loss(p, ids):
    logits = forward(p, ids)[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  from jlora._apply import infer_layout
  from jlora.finetune.model import resolve_targets

  small = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  lay = infer_layout(forward, params, small)
  linear = resolve_targets("all-linear", lay)
  targets = resolve_targets(args.targets, lay) if args.targets else linear
  return {"loss": loss, "params": params, "layout": lay, "targets": Rule(pattern=targets), "batch": ids,
          "quantize_targets": linear, "name": os.path.basename(os.path.abspath(directory))}


def run(args: argparse.Namespace) -> dict[str, Any]:
  if args.rank < 1 or args.batch < 1 or (args.seq is not None and args.seq < 2):
    raise ValueError("--rank and --batch must be >= 1 and --seq >= 2")
  m = preset_model(args.model, args) if args.model in PRESETS else hf_model(args.model, args)
  config = LoraConfig(rank=args.rank, alpha=args.alpha or 2.0 * args.rank, targets=m["targets"],
                      adapter_dtype=args.adapter_dtype)
  tx = optax.adam(1e-4) if args.optimizer == "adam" else optax.sgd(1e-4)
  methods = tuple(x for x in args.methods.split(",") if x)
  reports, skipped = compare(m["loss"], m["params"], m["batch"], config=config, methods=methods,
                             optimizer=tx, layout=m["layout"], quantize_targets=m["quantize_targets"])
  title = (f"{m['name']}: batch {m['batch'].shape[0]}x{m['batch'].shape[1]}, {args.optimizer}, "
           f"LoRA r={args.rank} ({config.adapter_dtype}) on {config.targets[0].pattern}")
  if args.plot:
    plot(reports, args.plot, title=title)
  return {"title": title, "table": title + "\n" + format_table(reports), "skipped": skipped,
          "reports": [r.as_dict() for r in reports]}


def plot(reports: list[MemoryReport], path: str, *, title: str = "") -> str:
  """A stacked bar per method, one segment per category (decimal GB)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(1.6 * len(reports) + 3, 4.5), dpi=100)
  bottom = [0.0] * len(reports)
  names = [r.method for r in reports]
  for cat in CATEGORIES:
    vals = [getattr(r, cat) / 1e9 for r in reports]
    ax.bar(names, vals, bottom=bottom, label=cat.replace("_", " "))
    bottom = [b + v for b, v in zip(bottom, vals)]
  ax.set_ylabel("GB (XLA compile-time analysis)")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
