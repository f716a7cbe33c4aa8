"""``jlora.init``: add trainable A, B beside every targeted kernel."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._config import KernelLayout, LoraConfig
from jlora._init_methods import resolve_init, variant_for
from jlora._lazy import is_lazy_node, placeholder
from jlora._targets import Target, select_targets
from jlora._tree import path_str
from jlora._weight import LoraSpec, LoraWeight, is_node

# The init-method registry lived here before jlora._init_methods: jlora/finetune/config.py still
# reads these two names here (a re-export to drop once it imports them from jlora._init_methods).
from jlora._init_methods import _lookup, init_method_names  # noqa: E402,F401

Params = Any


def _default_layout(path: str, shape: tuple[int, ...]) -> KernelLayout:
  name = path.rsplit("/", 1)[-1]
  if len(shape) == 2:
    if name == "embedding":
      return KernelLayout(in_axes=(0,), embedding=True)
    return KernelLayout(in_axes=(0,))
  raise ValueError(
      f"{path!r} has shape {shape}: jlora cannot tell its input axes from the shape alone "
      "(only 2-D (in, out) kernels and (vocab, dim) embeddings have a default). Pass "
      "layout=jlora.infer_layout(apply_fn, params, *example_args) to jlora.init, or give the "
      "rule an explicit layout, e.g. jlora.Rule(pattern=..., layout=jlora.KernelLayout(in_axes=(0,)))."
  )


def _resolve_layout(
    target: Target, shape: tuple[int, ...], layout: Mapping[str, KernelLayout] | None
) -> KernelLayout:
  path = target.path
  if target.rule.layout is not None:
    lay = target.rule.layout
  elif layout is not None:
    if path not in layout:
      raise ValueError(
          f"{path!r} is targeted but the function given to jlora.infer_layout never uses it as a "
          "kernel (no matmul, conv or lookup reads it), so an adapter there could not learn. "
          "Exclude it with LoraConfig(exclude=...) or give its rule an explicit layout."
      )
    lay = layout[path]
  else:
    lay = _default_layout(path, shape)
  try:
    lay = lay.normalized(len(shape))
  except ValueError as e:
    raise ValueError(f"{path!r} (shape {shape}): bad layout {lay}: {e}.") from None
  if not lay.out_axes(len(shape)):
    raise ValueError(
        f"{path!r} (shape {shape}): layout {lay} leaves no output axis for B; "
        "in_axes and batch_axes must not cover every axis."
    )
  return lay


def _check_leaf(path: str, leaf: Any, rule_index: int) -> tuple[tuple[int, ...], np.dtype]:
  if is_lazy_node(leaf):  # e.g. a 4-bit kernel: its dense shape and compute dtype
    leaf = placeholder(leaf)
  shape = tuple(getattr(leaf, "shape", ()))
  dtype = getattr(leaf, "dtype", None)
  if dtype is None or len(shape) < 2:
    what = f"a {len(shape)}-D array of shape {shape}" if dtype is not None else type(leaf).__name__
    raise ValueError(
        f"{path!r} matched LoraConfig.targets[{rule_index}] but is {what}; LoRA needs a kernel "
        "with at least 2 axes. Tighten the pattern (e.g. end it with '/kernel') or add the path "
        "to LoraConfig.exclude."
    )
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"{path!r} matched LoraConfig.targets[{rule_index}] but has dtype {dtype}; LoRA needs a "
        "floating-point kernel (quantized bases go through jlora's QLoRA support)."
    )
  return shape, np.dtype(dtype)


def init(
    key: jax.Array,
    params: Params,
    config: LoraConfig,
    *,
    layout: Mapping[str, KernelLayout] | None = None,
) -> Params:
  """Returns a new tree where every targeted kernel is a ``jlora.LoraWeight``.

  Each matched kernel ``W0`` stays as the frozen ``w0`` child and gets
  trainable ``a`` (shape ``(*batch, *in, r)``) and ``b`` (``(*batch, r, *out)``)
  children. Works on concrete arrays and inside ``jax.eval_shape`` /
  ``jax.jit`` (with ``out_shardings`` the adapters are created sharded).

  Which kernel axes are inputs comes from, in order: the matching rule's
  ``layout``; ``layout[path]`` (typically from ``jlora.infer_layout``); the
  default for 2-D arrays (``(in, out)`` kernels, ``(vocab, dim)`` tables named
  ``embedding``). Kernels with more axes need one of the first two.

  Args:
    key: PRNG key; split once per targeted kernel, never reused.
    params: the model parameters (any pytree: linen dicts, NNX ``State``...).
    config: which kernels get adapters, rank, alpha, init.
    layout: optional per-path kernel layouts from ``jlora.infer_layout``.

  Returns:
    A new pytree of the same structure with ``LoraWeight`` nodes at the targets.

  Raises:
    ValueError: a rule matches nothing, a matched leaf is not a floating
      kernel, the rank exceeds what the kernel allows, or a layout is missing.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"dense": {"kernel": jnp.ones((16, 32)), "bias": jnp.zeros(32)}}
    >>> cfg = jlora.LoraConfig(rank=4, alpha=8, targets=r".*/kernel")
    >>> lp = jlora.init(jax.random.key(0), params, cfg)
    >>> lp["dense"]["kernel"].a.shape, lp["dense"]["kernel"].b.shape
    ((16, 4), (4, 32))
  """
  if not isinstance(config, LoraConfig):
    raise ValueError(f"jlora.init: config must be a jlora.LoraConfig, got {type(config).__name__}.")
  targets = select_targets(params, config)
  keys = jax.random.split(key, len(targets))
  variant = variant_for(config)
  replacements: dict[str, LoraWeight] = {}
  for k, target in zip(keys, targets):
    shape, _ = _check_leaf(target.path, target.leaf, target.rule_index)
    lay = _resolve_layout(target, shape, layout)
    rank = target.rule.rank if target.rule.rank is not None else config.rank
    alpha = target.rule.alpha if target.rule.alpha is not None else config.alpha
    spec = LoraSpec(
        shape=shape, layout=lay, rank=int(rank), alpha=float(alpha),
        rslora=config.rslora if target.rule.rslora is None else target.rule.rslora,
        dropout=float(config.dropout), variant=variant,
    )
    limit = min(spec.fan_in, spec.fan_out)
    if spec.rank > limit:
      raise ValueError(
          f"{target.path!r} (shape {shape}, in axes {lay.in_axes}): rank {spec.rank} exceeds "
          f"min(fan_in={spec.fan_in}, fan_out={spec.fan_out}) = {limit}; a larger rank adds "
          f"parameters without adding expressiveness. Use rank <= {limit} for this kernel "
          "(a Rule with its own rank) or exclude it."
      )
    w0, factors = resolve_init(config.init)(k, spec, target.leaf, config)
    dtype = jnp.dtype(config.adapter_dtype)
    factors = {n: jnp.asarray(f).astype(dtype) for n, f in factors.items()}
    extras = {n: jnp.asarray(f) for n, f in spec.variant.init_extras(spec, w0, factors).items()}
    replacements[target.path] = LoraWeight(w0, factors.pop("a"), factors.pop("b"), spec, extras)

  def replace(path, leaf):
    return replacements.get(path_str(path), leaf)

  return jax.tree_util.tree_map_with_path(replace, params, is_leaf=is_node)
