"""Training memory from XLA's compile-time analysis of the real train step (nothing runs).

The step is the one the fine-tuning command runs: loss and gradient with respect
to the trained parameters, then the optimizer update, jitted with the trained
parameters and the optimizer state donated. It is lowered and compiled from
shapes alone (``jax.ShapeDtypeStruct``), so a 175B-parameter model costs a few
seconds of compilation and no memory. XLA reports, for the compiled step, the
bytes of its arguments, outputs (and those aliased to donated arguments) and
temporaries; the report splits them into what a reader wants to compare:

* arguments = frozen weights + trained weights + optimizer state + the batch
  (each counted from the shapes and checked to add up to XLA's figure);
* temporaries = gradients (the size of the trained parameters: XLA holds them in
  its temporary buffers) + activations and other temporaries (the rest);
* outputs that are not aliased to donated arguments (the loss, ...).

The total is XLA's peak estimate ``arguments + outputs − aliased + temporaries``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax

from jlora._apply.wrap import wrap
from jlora._config import KernelLayout, LoraConfig
from jlora._count import count
from jlora._init import init as lora_init
from jlora._lazy import is_lazy_node
from jlora._optim import optimizer as lora_optimizer
from jlora._partition import combine, split

Params = Any
LossFn = Callable[[Params, Any], Any]

CATEGORIES = ("frozen_weights", "trainable_weights", "gradients", "optimizer_state", "activations", "inputs",
              "outputs")


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Bytes of one train step, by category, with XLA's own figures."""

  method: str
  frozen_weights: int
  trainable_weights: int
  gradients: int
  optimizer_state: int
  activations: int  # XLA's temporaries beyond the gradients: activations kept for the backward pass, workspace
  inputs: int  # the batch
  outputs: int  # step outputs not aliased to donated arguments (the loss, ...)
  checkpoint: int  # what a checkpoint of the trained state holds (all weights for full fine-tuning)
  trainable_params: int
  xla_argument: int
  xla_output: int
  xla_alias: int
  xla_temp: int

  @property
  def total(self) -> int:
    return sum(getattr(self, c) for c in CATEGORIES)

  @property
  def xla_total(self) -> int:
    return self.xla_argument + self.xla_output - self.xla_alias + self.xla_temp

  def as_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "total": self.total, "xla_total": self.xla_total}


def tree_bytes(tree: Any) -> int:
  """Bytes of every array leaf (``ShapeDtypeStruct`` too; lazy kernels count their stored arrays)."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_lazy_node):
    leaves = jax.tree_util.tree_leaves(leaf) if is_lazy_node(leaf) else [leaf]
    for x in leaves:
      if hasattr(x, "shape") and hasattr(x, "dtype"):
        total += int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype) if hasattr(x, "dtype") else x, tree)


def _analyse(step, args) -> dict[str, int]:
  mem = step.lower(*args).compile().memory_analysis()
  return {"xla_argument": int(mem.argument_size_in_bytes), "xla_output": int(mem.output_size_in_bytes),
          "xla_alias": int(mem.alias_size_in_bytes), "xla_temp": int(mem.temp_size_in_bytes)}


def memory_report(loss_fn: LossFn, params: Params, batch: Any, *, config: LoraConfig | None,
                  optimizer: optax.GradientTransformation | None = None,
                  layout: Mapping[str, KernelLayout] | None = None,
                  prepare: Callable[[Params], Params] | None = None, method: str | None = None) -> MemoryReport:
  """Compiles one train step from shapes and reports its memory by category.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` of the plain model (it is
      wrapped with ``jlora.wrap`` for adapters).
    params: the base parameters (arrays or ``jax.ShapeDtypeStruct``).
    batch: one batch (arrays or ``ShapeDtypeStruct``).
    config: the adapters to train; ``None`` = full fine-tuning of every parameter.
    optimizer: default ``optax.adamw(1e-4)``.
    layout: kernel layouts for ``jlora.init`` (``jlora.infer_layout``).
    prepare: applied to the base before ``jlora.init`` (e.g. quantization for QLoRA).
    method: the name shown in tables (default: "full", "lora", or the variant's name).

  Returns:
    A ``MemoryReport``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32)}
    >>> batch = jax.ShapeDtypeStruct((8, 256), jnp.float32)
    >>> loss = lambda p, x: jnp.mean((x @ p["w"]) ** 2)
    >>> r = jlora.memory_report(loss, params, batch, config=jlora.LoraConfig(rank=4, targets="w"))
    >>> r.frozen_weights, r.trainable_weights, r.total == r.xla_total
    (262144, 8192, True)
  """
  tx = optimizer if optimizer is not None else optax.adamw(1e-4)
  params = _abstract(params)
  batch = _abstract(batch)
  key = jax.random.key(0)
  if config is None:
    trained, frozen = params, None
    step_tx = tx
    name = method or "full"

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(trained, opt_state, frozen, batch):
      loss, g = jax.value_and_grad(loss_fn)(trained, batch)
      u, opt_state = step_tx.update(g, opt_state, trained)
      return optax.apply_updates(trained, u), opt_state, loss

    checkpoint = tree_bytes(params)
  else:
    def build(p):
      return lora_init(key, prepare(p) if prepare is not None else p, config, layout=layout)

    lp = jax.eval_shape(build, params)
    trained, frozen = split(lp)
    step_tx = lora_optimizer(tx, trained)
    wrapped = wrap(loss_fn)
    variant = config.variant.name
    name = method or ("lora" if variant == "lora" else variant)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(trained, opt_state, frozen, batch):
      loss, g = jax.value_and_grad(lambda a: wrapped(combine(a, frozen), batch))(trained)
      u, opt_state = step_tx.update(g, opt_state, trained)
      return optax.apply_updates(trained, u), opt_state, loss

    checkpoint = count(lp).adapter_bytes
  opt_state = jax.eval_shape(step_tx.init, trained)
  xla = _analyse(step, (trained, opt_state, frozen, batch))
  sizes = {"frozen_weights": tree_bytes(frozen), "trainable_weights": tree_bytes(trained),
           "optimizer_state": tree_bytes(opt_state), "inputs": tree_bytes(batch)}
  n_trainable = sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(trained))
  gradients = min(sizes["trainable_weights"], xla["xla_temp"])
  return MemoryReport(
      method=name, gradients=gradients, activations=xla["xla_temp"] - gradients,
      outputs=xla["xla_output"] - xla["xla_alias"], checkpoint=checkpoint, trainable_params=n_trainable,
      **sizes, **xla)


def format_bytes(n: float) -> str:
  """Decimal units, three significant digits.

  Example:
    >>> from jlora.memory import format_bytes
    >>> format_bytes(37_748_736), format_bytes(1.416e12)
    ('37.7 MB', '1.42 TB')
  """
  for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
    if abs(n) >= size:
      return f"{n / size:.3g} {unit}"
  return f"{int(n)} B"


def format_table(reports: list[MemoryReport]) -> str:
  """A text table, one column per method (decimal units: 1 GB = 1e9 bytes).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from jlora.memory import format_table
    >>> p, x = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}, jax.ShapeDtypeStruct((4, 64), jnp.float32)
    >>> loss = lambda p, x: jnp.sum(x @ p["w"])
    >>> print(format_table([jlora.memory_report(loss, p, x, config=None)]).splitlines()[0])
    category                       full
  """
  rows = [("frozen weights", "frozen_weights"), ("trainable weights", "trainable_weights"),
          ("gradients", "gradients"), ("optimizer state", "optimizer_state"),
          ("activations + temporaries", "activations"), ("batch", "inputs"), ("other outputs", "outputs")]
  width = max(12, *(len(r.method) + 2 for r in reports), *(len(f"{r.trainable_params:,}") + 2 for r in reports))
  lines = ["category".ljust(26) + "".join(r.method.rjust(width) for r in reports)]
  for label, attr in rows:
    lines.append(label.ljust(26) + "".join(format_bytes(getattr(r, attr)).rjust(width) for r in reports))
  lines.append("total (XLA peak estimate)".ljust(26) + "".join(format_bytes(r.total).rjust(width) for r in reports))
  lines.append("checkpoint".ljust(26) + "".join(format_bytes(r.checkpoint).rjust(width) for r in reports))
  lines.append("trainable params".ljust(26) + "".join(f"{r.trainable_params:,}".rjust(width) for r in reports))
  return "\n".join(lines)
