"""``jlora.quantize`` / ``jlora.dequantize``: replace kernels by ``NF4Weight`` nodes and back."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._config import KernelLayout
from jlora._lazy import is_lazy_node
from jlora._tree import close_matches, leaves_with_paths, path_str
from jlora._weight import is_lora_weight, is_node
from jlora.quant._format import NF4Format
from jlora.quant._weight import NF4Weight, is_nf4

Params = Any
Patterns = str | Sequence[str]


def _patterns(value: Patterns, name: str) -> tuple[str, ...]:
  pats = (value,) if isinstance(value, str) else tuple(value)
  for p in pats:
    if not isinstance(p, str):
      raise ValueError(f"jlora.quantize: {name} must be regexes (str), got {p!r}.")
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"jlora.quantize: {name} pattern {p!r} is not a valid regex: {e}.") from None
  return pats


def _layout_for(path: str, shape: tuple[int, ...], layout: Mapping[str, KernelLayout] | None) -> KernelLayout:
  if layout is not None and path in layout:
    lay = layout[path]
  elif len(shape) == 2:
    if path.rsplit("/", 1)[-1] == "embedding":
      lay = KernelLayout(in_axes=(0,), embedding=True)
    else:
      lay = KernelLayout(in_axes=(0,))
  else:
    raise ValueError(
        f"jlora.quantize: {path!r} has shape {shape}; only 2-D (in, out) kernels have a default layout. "
        "Pass layout={path: jlora.KernelLayout(in_axes=..., batch_axes=...)} (e.g. from "
        "jlora.infer_layout(apply_fn, params, *example_args) or model.layout).")
  try:
    lay = lay.normalized(len(shape))
  except ValueError as e:
    raise ValueError(f"jlora.quantize: {path!r} (shape {shape}): bad layout {lay}: {e}.") from None
  if lay.embedding:
    raise ValueError(f"jlora.quantize: {path!r} is an embedding table; bitsandbytes quantizes linear layers "
                     "only (embeddings and lm_head stay in 16/32 bits). Exclude it from the targets.")
  if tuple(lay.batch_axes) != tuple(range(len(lay.batch_axes))):
    raise ValueError(f"jlora.quantize: {path!r} (shape {shape}) has stacked axes {lay.batch_axes}; stacked "
                     "axes must lead the kernel (lax.scan slices the leading axis).")
  return lay


@functools.lru_cache(maxsize=None)
def _encoder(fmt: NF4Format):
  """A jitted quantizer for kernels of one format; stacked layers one at a time (``lax.map``)."""

  def encode(w):
    if fmt.stack == 0:
      return fmt.encode_layer(w)
    flat = w.reshape(-1, *fmt.shape[fmt.stack:])
    out = jax.lax.map(fmt.encode_layer, flat)
    return {k: v.reshape(*fmt.stack_shape, *v.shape[1:]) for k, v in out.items()}

  return jax.jit(encode)


def quantize(
    params: Params,
    *,
    targets: Patterns,
    exclude: Patterns = (),
    blocksize: int = 64,
    double_quant: bool = True,
    quant_type: str = "nf4",
    compute_dtype: Any = None,
    layout: Mapping[str, KernelLayout] | None = None,
) -> Params:
  """Replaces every targeted kernel with a ``jlora.NF4Weight`` in bitsandbytes' 4-bit format.

  Each kernel (each stacked layer of a ``(layers, in, out)`` kernel) is
  quantized as bitsandbytes quantizes the PyTorch ``[out, in]`` weight it
  corresponds to (``Params4bit`` / ``quantize_4bit``): the same packed bytes and
  block absmaxes, bit for bit, for float32, bfloat16 and float16 kernels; with
  ``double_quant`` the absmaxes are quantized again to 8 bits as bitsandbytes'
  CPU kernel does. Storage: 4.127 bits per parameter with double quantization,
  4.5 without (blocksize 64).

  Args:
    params: any parameter pytree (arrays or ``jax.ShapeDtypeStruct`` under ``jax.eval_shape``).
    targets: regex(es) fullmatched on ``/``-joined parameter paths; each must match.
    exclude: regex(es) of paths to leave alone (e.g. ``lm_head``); each must match.
    blocksize: elements per absmax block, a power of two in 32..4096 (QLoRA: 64).
    double_quant: quantize the absmaxes too (QLoRA's double quantization).
    quant_type: ``"nf4"`` (QLoRA's NormalFloat) or ``"fp4"``.
    compute_dtype: dtype the kernels decode to in ``jlora.wrap`` (default: their own).
    layout: per-path ``jlora.KernelLayout`` for kernels that are not 2-D ``(in, out)``
      (stacked ``(layers, in, out)``: ``KernelLayout(in_axes=(1,), batch_axes=(0,))``;
      ``jlora.infer_layout`` or ``model.layout`` give them all).

  Returns:
    A new tree with ``NF4Weight`` nodes at the targets.

  Raises:
    ValueError: a bad blocksize or quant type; a pattern that matches nothing; a
      target that is not a floating kernel with >= 2 axes, is an embedding, or is
      already quantized or adapted.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> params = {"mlp": {"kernel": jnp.ones((256, 64), jnp.bfloat16)}, "norm": jnp.ones(64)}
    >>> q = jlora.quantize(params, targets=".*/kernel")
    >>> q["mlp"]["kernel"].packed.dtype, jlora.dequantize(q)["mlp"]["kernel"].dtype
    (dtype('uint8'), dtype(bfloat16))
  """
  targets = _patterns(targets, "targets")
  excludes = _patterns(exclude, "exclude")
  if not targets:
    raise ValueError("jlora.quantize: targets is empty; give the regexes of the kernels to quantize.")
  # Validates blocksize / quant_type / compute_dtype once, before touching any leaf.
  NF4Format(shape=(1, 1), dtype="float32", in_axes=(0,), blocksize=blocksize, quant_type=quant_type,
            double_quant=bool(double_quant), compute_dtype=compute_dtype)
  entries = list(leaves_with_paths(params, is_leaf=is_node))
  hits = [0] * len(targets)
  ex_hits = [0] * len(excludes)
  chosen: dict[str, Any] = {}
  for path, leaf in entries:
    matched = [i for i, t in enumerate(targets) if re.fullmatch(t, path)]
    for i in matched:
      hits[i] += 1
    dropped = [j for j, e in enumerate(excludes) if re.fullmatch(e, path)]
    for j in dropped:
      ex_hits[j] += 1
    if not matched or dropped:
      continue
    where = f"jlora.quantize: {path!r} (matched targets[{matched[0]}] {targets[matched[0]]!r})"
    if is_nf4(leaf) or is_lazy_node(leaf):
      raise ValueError(f"{where} is already quantized; quantize the original params once, or exclude it.")
    if is_lora_weight(leaf):
      raise ValueError(f"{where} holds a LoRA adapter; quantize the base before jlora.init "
                       "(jlora.init(key, jlora.quantize(params, ...), config)).")
    shape, dtype = tuple(getattr(leaf, "shape", ())), getattr(leaf, "dtype", None)
    if dtype is None or len(shape) < 2 or not jnp.issubdtype(dtype, jnp.floating):
      what = f"a {jnp.dtype(dtype).name} array of shape {shape}" if dtype is not None else type(leaf).__name__
      raise ValueError(f"{where} is {what}, not a floating kernel with at least 2 axes; tighten the "
                       "pattern (e.g. end it with '/kernel') or add the path to exclude.")
    lay = _layout_for(path, shape, layout)
    fmt = NF4Format(shape=shape, dtype=jnp.dtype(dtype).name, in_axes=lay.in_axes, stack=len(lay.batch_axes),
                    blocksize=blocksize, quant_type=quant_type, double_quant=bool(double_quant),
                    compute_dtype=compute_dtype)
    chosen[path] = fmt
  paths = [p for p, _ in entries]
  kernels = [p for p, x in entries if len(getattr(x, "shape", ())) >= 2]
  for i, t in enumerate(targets):
    if not hits[i]:
      near = close_matches(t, kernels or paths)
      raise ValueError(f"jlora.quantize: targets[{i}] ({t!r}) matched no parameter path (regex fullmatch on "
                       f"'/'-joined paths).{f' Did you mean {near[0]!r}?' if near else ''} Paths look like: "
                       f"{', '.join(repr(p) for p in (kernels or paths)[:6])}.")
  for j, e in enumerate(excludes):
    if not ex_hits[j]:
      raise ValueError(f"jlora.quantize: exclude[{j}] ({e!r}) matched no parameter path; fix or remove it.")
  if not chosen:
    raise ValueError("jlora.quantize: every targeted path is excluded; nothing to quantize.")

  def replace(path, leaf):
    fmt = chosen.get(path_str(path))
    if fmt is None:
      return leaf
    if isinstance(leaf, jax.ShapeDtypeStruct):
      storage = jax.eval_shape(_encoder(fmt), leaf)
    else:
      storage = _encoder(fmt)(leaf)
    return NF4Weight.from_storage(storage, fmt)

  return jax.tree_util.tree_map_with_path(replace, params, is_leaf=is_node)


def dequantize(params: Params, *, dtype: Any = None) -> Params:
  """Replaces every ``NF4Weight`` (also an adapter's base) with its dense kernel.

  Decodes as bitsandbytes' ``dequantize_4bit`` does: ``code * absmax`` in
  float32, cast once to the original dtype (or ``dtype``).

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> w = jnp.linspace(-1.0, 1.0, 64 * 4).reshape(64, 4)
    >>> back = jlora.dequantize(jlora.quantize({"w": w}, targets="w"))["w"]
    >>> back.shape, bool(jnp.abs(back - w).max() < 0.2)  # the widest NF4 half step is 0.14·absmax
    ((64, 4), True)
  """

  def dense(x):
    if is_nf4(x):
      return x.dequantize(dtype)
    if is_lora_weight(x) and is_nf4(x.w0):
      return x.replace(w0=x.w0.dequantize(dtype))
    return x

  return jax.tree_util.tree_map(dense, params, is_leaf=is_node)


def storage_bits(params: Params) -> float:
  """Stored bits per quantized parameter over every ``NF4Weight`` of the tree.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> from jlora.quant import storage_bits
    >>> round(storage_bits(jlora.quantize({"w": jnp.ones((4096, 64))}, targets="w")), 3)
    4.127
  """
  nodes = [x.w0 if is_lora_weight(x) else x for x in jax.tree_util.tree_leaves(params, is_leaf=is_node)]
  nodes = [x for x in nodes if is_nf4(x)]
  if not nodes:
    raise ValueError("storage_bits: the tree holds no NF4Weight.")
  total = sum(x.nbytes for x in nodes)
  numel = sum(int(np.prod(x.shape, dtype=np.int64)) for x in nodes)
  return 8.0 * total / numel
