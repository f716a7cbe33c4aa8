"""What ``python -m jlora.memory`` computes: model shapes (preset or HF config), reports, plot."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jlora import models
from jlora._apply.wrap import infer_layout
from jlora._config import KernelLayout, LoraConfig, Rule
from jlora._targets import expand_targets
from jlora.memory import _gpt
from jlora.memory._compare import compare
from jlora.memory._report import CATEGORIES, MemoryReport, format_table

PRESETS = _gpt.PRESETS


def preset_model(name: str, args) -> dict[str, Any]:
  cfg = PRESETS[name]
  if args.dtype:
    cfg = dataclasses.replace(cfg, dtype=args.dtype)
  seq = args.seq or cfg.context
  if seq > cfg.context:
    raise ValueError(f"--seq {seq} exceeds the model's context {cfg.context}")
  params = _gpt.param_shapes(cfg)
  lay = _gpt.layouts(params)
  spec = args.targets or "query,value"
  return {"loss": _gpt.loss_fn(cfg), "params": params, "layout": lay,
          "targets": expand_targets(spec, lay, model=f"the {name} preset"), "spec": spec,
          "batch": jax.ShapeDtypeStruct((args.batch, seq), jnp.int32),
          "quantize_targets": r"layers/(attn|mlp)/\w+/kernel", "name": name}


def hf_model(directory: str, args) -> dict[str, Any]:
  """Shapes of a Hugging Face causal LM from its config.json alone (no weights read).

  The families ``jlora.models`` implements run on its native decoder, others on
  transformers 4.x's Flax classes (when installed), as ``jlora-finetune`` does.
  """
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--model {directory!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a "
                            "directory with a config.json")
  with open(path) as f:
    model_type = json.load(f).get("model_type")
  dtype = jnp.dtype(args.dtype or "float32")
  seq = args.seq or 512
  if model_type in models.SUPPORTED_MODEL_TYPES:
    decoder = models.Decoder(models.read_config(directory))
    params, lay = decoder.shapes(dtype), decoder.layout
    forward = decoder.__call__
  else:
    params, lay, forward = _flax_model(directory, dtype)
  name = os.path.basename(os.path.abspath(directory))

  def loss(p, ids):
    logits = forward(p, ids)[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  spec = args.targets or "all-linear"
  what = f"{name} ({model_type})"
  return {"loss": loss, "params": params, "layout": lay, "targets": expand_targets(spec, lay, model=what),
          "spec": spec, "batch": jax.ShapeDtypeStruct((args.batch, seq), jnp.int32),
          "quantize_targets": expand_targets("all-linear", lay, model=what), "name": name}


def _flax_model(directory: str, dtype: Any) -> tuple[Any, dict[str, KernelLayout], Any]:
  """``(param shapes, layout, forward)`` of a transformers 4.x Flax causal LM (GPT-2, OPT, ...)."""
  try:
    import transformers
  except ImportError:
    raise NotImplementedError(f"--model {directory!r}: architectures jlora.models does not implement need "
                              "transformers 4.x (pip install 'jlora[hf]')") from None
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")
    config = transformers.AutoConfig.from_pretrained(directory)
    model = transformers.FlaxAutoModelForCausalLM.from_config(config, _do_init=False, dtype=dtype)
  params = jax.eval_shape(lambda k: model.init_weights(k, (1, 8)), jax.random.key(0))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating)
                                                       else x.dtype), params)

  def forward(p, ids):
    return model(ids, params=p).logits

  lay = infer_layout(forward, params, jax.ShapeDtypeStruct((1, 8), jnp.int32))
  return params, lay, forward


def run(args: argparse.Namespace) -> dict[str, Any]:
  if args.rank < 1 or args.batch < 1 or (args.seq is not None and args.seq < 2):
    raise ValueError("--rank and --batch must be >= 1 and --seq >= 2")
  m = preset_model(args.model, args) if args.model in PRESETS else hf_model(args.model, args)
  config = LoraConfig(rank=args.rank, alpha=args.alpha or 2.0 * args.rank, targets=Rule(pattern=m["targets"]),
                      adapter_dtype=args.adapter_dtype)
  tx = optax.adam(1e-4) if args.optimizer == "adam" else optax.sgd(1e-4)
  methods = tuple(x for x in args.methods.split(",") if x)
  reports, skipped = compare(m["loss"], m["params"], m["batch"], config=config, methods=methods,
                             optimizer=tx, layout=m["layout"], quantize_targets=m["quantize_targets"])
  shown = m["spec"] if m["spec"] == "all-linear" else m["targets"]  # all-linear: a long list of paths
  title = (f"{m['name']}: batch {m['batch'].shape[0]}x{m['batch'].shape[1]}, {args.optimizer}, "
           f"LoRA r={args.rank} ({config.adapter_dtype}) on {shown}")
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
