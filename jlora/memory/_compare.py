"""Several training methods of one model side by side: full fine-tuning, LoRA, DoRA, QLoRA."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optax

from jlora._config import KernelLayout, LoraConfig
from jlora.memory._report import LossFn, MemoryReport, memory_report
from jlora.quant import quantize

Params = Any
# A method maps (the LoRA config, context) to memory_report's ``config`` and ``prepare``.
Method = Callable[..., dict[str, Any]]
METHODS: dict[str, Method] = {}


def register_method(name: str, fn: Method) -> None:
  """Adds a method for ``compare`` (``fn(config, *, layout, quantize_targets) -> {"config", "prepare"}``).

  Example:
    >>> from jlora.memory import METHODS
    >>> {"full", "lora", "dora", "qlora"} <= set(METHODS)  # built in (tests may register more)
    True
  """
  METHODS[name] = fn


def _full(config, **ctx):
  return {"config": None}


def _lora(config, **ctx):
  return {"config": config}


def _dora(config, **ctx):
  return {"config": dataclasses.replace(config, dora=True)}


def _qlora(config, *, layout=None, quantize_targets=None, **ctx):
  """4-bit NF4 base (``jlora.quantize``) with LoRA on top."""
  targets = quantize_targets if quantize_targets is not None else tuple(r.pattern for r in config.targets)
  return {"config": config, "prepare": lambda p: quantize(p, targets=targets, layout=layout)}


for _name, _fn in (("full", _full), ("lora", _lora), ("dora", _dora), ("qlora", _qlora)):
  register_method(_name, _fn)


def compare(loss_fn: LossFn, params: Params, batch: Any, *, config: LoraConfig,
            methods: Sequence[str] = ("full", "lora", "dora", "qlora"),
            optimizer: optax.GradientTransformation | None = None,
            layout: Mapping[str, KernelLayout] | None = None,
            quantize_targets: Any = None) -> tuple[list[MemoryReport], dict[str, str]]:
  """``memory_report`` of each method on the same model, batch and optimizer.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    params: base parameters (arrays or shapes).
    batch: one batch.
    config: the LoRA configuration (DoRA and QLoRA use it too).
    methods: names in ``METHODS``.
    optimizer: default ``optax.adamw(1e-4)``.
    layout: kernel layouts.
    quantize_targets: regexes of the kernels QLoRA stores in 4 bits (default: the LoRA targets).

  Returns:
    ``(reports, skipped)``: the reports, and ``{method: reason}`` for the methods
    that are unavailable here (e.g. QLoRA without ``jlora.quant``).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from jlora.memory import compare
    >>> p, x = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}, jax.ShapeDtypeStruct((4, 64), jnp.float32)
    >>> reports, _ = compare(lambda p, x: jnp.sum(x @ p["w"]), p, x, config=jlora.LoraConfig(rank=2, targets="w"),
    ...                      methods=("full", "lora"))
    >>> [r.method for r in reports]
    ['full', 'lora']
  """
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ValueError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}.")
  reports, skipped = [], {}
  for name in methods:
    try:
      kwargs = METHODS[name](config, layout=layout, quantize_targets=quantize_targets)
    except NotImplementedError as e:
      skipped[name] = str(e)
      continue
    reports.append(memory_report(loss_fn, params, batch, optimizer=optimizer, layout=layout, method=name, **kwargs))
  return reports, skipped
