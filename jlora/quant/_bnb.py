"""bitsandbytes state dicts (pre-quantized Hugging Face ``*-bnb-4bit`` checkpoints) <-> ``NF4Weight``.

A ``bnb.nn.Linear4bit`` saves, per weight: ``weight`` (packed uint8 ``[ceil(n/2), 1]``,
or another ``quant_storage`` dtype viewing the same bytes), ``weight.absmax``,
``weight.quant_map`` (the 16 code values), with double quantization
``weight.nested_absmax`` and ``weight.nested_quant_map`` (the 256-value dynamic map),
and ``weight.quant_state.bitsandbytes__<nf4|fp4>``: uint8 bytes of a JSON object with
``quant_type``, ``blocksize``, ``dtype``, ``shape`` (PyTorch ``[out, in]``) and, nested,
``nested_blocksize``, ``nested_dtype``, ``nested_offset`` (``QuantState.as_dict(packed=True)``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.quant import _blockwise, _codebook
from jlora.quant._format import NF4Format
from jlora.quant._weight import NF4Weight

STATE_KEY = "quant_state.bitsandbytes__"


def _np(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch tensor (tests, or a state dict from PyTorch)
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      x = x.view(__import__("torch").int16)
    x = x.numpy()
  return np.asarray(jax.device_get(x))


def quant_state_keys(prefix: str = "weight") -> tuple[str, ...]:
  """Every key a 4-bit weight may add beside ``prefix`` in a state dict.

  Example:
    >>> from jlora.quant import quant_state_keys
    >>> quant_state_keys("w")[:2]
    ('w.absmax', 'w.quant_map')
  """
  return tuple(f"{prefix}.{k}" for k in ("absmax", "quant_map", "nested_absmax", "nested_quant_map")) + tuple(
      f"{prefix}.{STATE_KEY}{t}" for t in _codebook.QUANT_TYPES)


def is_bnb_4bit(entries: Mapping[str, Any], prefix: str = "weight") -> bool:
  """Whether ``entries`` holds a bitsandbytes 4-bit weight under ``prefix``.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> from jlora.quant import is_bnb_4bit, to_bnb
    >>> sd = to_bnb(jlora.quantize({"w": jnp.ones((64, 8))}, targets="w")["w"], prefix="lin.weight")
    >>> is_bnb_4bit(sd, "lin.weight"), is_bnb_4bit({"lin.weight": sd["lin.weight"]}, "lin.weight")
    (True, False)
  """
  return any(f"{prefix}.{STATE_KEY}{t}" in entries for t in _codebook.QUANT_TYPES)


def to_bnb(w: NF4Weight, *, index: Sequence[int] = (), prefix: str = "weight") -> dict[str, np.ndarray]:
  """The bitsandbytes state-dict entries of one matrix of ``w`` (a stacked node: the one at ``index``).

  ``bnb.nn.Linear4bit.load_state_dict`` (and transformers' loader of ``*-bnb-4bit``
  checkpoints) accept them as they are.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> from jlora.quant import to_bnb
    >>> sd = to_bnb(jlora.quantize({"w": jnp.ones((128, 32))}, targets="w")["w"])
    >>> sd["weight"].shape, sd["weight.absmax"].dtype
    ((2048, 1), dtype('uint8'))
  """
  f = w.format
  index = tuple(index)
  if len(index) != f.stack:
    raise ValueError(f"to_bnb: the kernel has {f.stack} stacked axes {f.stack_shape}; give index= with one "
                     f"entry per stacked axis, got {index}.")
  one = {k: _np(v)[index] if index else _np(v) for k, v in w.storage.items()}
  out = {
      prefix: one["packed"].reshape(-1, 1).astype(np.uint8),
      f"{prefix}.absmax": one["absmax"].reshape(-1),
      f"{prefix}.quant_map": _codebook.code(f.quant_type).copy(),
  }
  state = {"quant_type": f.quant_type, "blocksize": f.blocksize, "dtype": f.dtype, "shape": list(f.torch_shape)}
  if f.double_quant:
    out[f"{prefix}.nested_absmax"] = one["nested_absmax"].reshape(-1).astype(np.float32)
    out[f"{prefix}.nested_quant_map"] = _codebook.DYNAMIC.copy()
    state.update(nested_blocksize=_blockwise.NESTED_BLOCKSIZE, nested_dtype="float32",
                 nested_offset=float(np.float32(one["nested_offset"])))
  out[f"{prefix}.{STATE_KEY}{f.quant_type}"] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()
  return out


def _state(entries: Mapping[str, Any], prefix: str) -> tuple[str, dict]:
  keys = [f"{prefix}.{STATE_KEY}{t}" for t in _codebook.QUANT_TYPES if f"{prefix}.{STATE_KEY}{t}" in entries]
  if len(keys) != 1:
    raise ValueError(f"from_bnb: expected exactly one {prefix}.{STATE_KEY}<nf4|fp4> entry, found {keys or 'none'}; "
                     "is this a bitsandbytes 4-bit weight?")
  return keys[0], json.loads(bytes(_np(entries[keys[0]]).astype(np.uint8).tobytes()).decode())


def from_bnb(entries: Mapping[str, Any], *, prefix: str = "weight", shape: Sequence[int] | None = None,
             in_axes: Sequence[int] = (0,), compute_dtype: Any = None) -> NF4Weight:
  """An ``NF4Weight`` from one bitsandbytes 4-bit weight's state-dict entries (exact bytes).

  Args:
    entries: the state dict (or the part of it under one module), arrays or tensors.
    prefix: the weight's key (``"weight"``, or ``"model.layers.0.mlp.up_proj.weight"``).
    shape: the JAX kernel's shape; default ``(in, out)`` from the PyTorch ``[out, in]``.
    in_axes: the kernel's input axes (with ``shape`` for kernels of more than two axes).
    compute_dtype: dtype the apply path decodes to (default: the saved ``dtype``).

  Raises:
    ValueError: entries missing or inconsistent, a code book other than bitsandbytes'
      NF4/FP4 and dynamic map, or a shape that does not hold ``out·in`` elements.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> from jlora.quant import from_bnb, to_bnb
    >>> q = jlora.quantize({"w": jnp.ones((128, 32))}, targets="w")["w"]
    >>> back = from_bnb(to_bnb(q))
    >>> back.shape, bool((back.dequantize() == q.dequantize()).all())
    ((128, 32), True)
  """
  key, st = _state(entries, prefix)
  where = f"from_bnb({key!r})"
  for k in ("quant_type", "blocksize", "dtype", "shape"):
    if k not in st:
      raise ValueError(f"{where}: the quant state has no {k!r} ({sorted(st)}).")
  out_n, in_n = (int(d) for d in st["shape"]) if len(st["shape"]) == 2 else (int(st["shape"][0]), int(np.prod(st["shape"][1:])))
  nested = "nested_offset" in st
  if shape is None:
    shape, in_axes = (in_n, out_n), (0,)
  fmt = NF4Format(shape=tuple(shape), dtype=st["dtype"], in_axes=tuple(in_axes), blocksize=int(st["blocksize"]),
                  quant_type=st["quant_type"], double_quant=nested, compute_dtype=compute_dtype)
  if fmt.torch_shape != (out_n, in_n):
    raise ValueError(f"{where}: kernel shape {tuple(shape)} with in_axes {tuple(in_axes)} is a [{fmt.n_out}, "
                     f"{fmt.n_in}] matrix, but the checkpoint holds [{out_n}, {in_n}].")
  missing = [k for k in ([prefix, f"{prefix}.absmax"] + ([f"{prefix}.nested_absmax"] if nested else []))
             if k not in entries]
  if missing:
    raise ValueError(f"{where}: missing entries {missing}.")
  qmap = entries.get(f"{prefix}.quant_map")
  if qmap is not None and not np.array_equal(_np(qmap).astype(np.float32), _codebook.code(fmt.quant_type)):
    raise ValueError(f"{where}: quant_map is not bitsandbytes' {fmt.quant_type} code book; custom 4-bit "
                     "codes are not supported.")
  nmap = entries.get(f"{prefix}.nested_quant_map")
  if nested and nmap is not None and not np.array_equal(_np(nmap).astype(np.float32), _codebook.DYNAMIC):
    raise ValueError(f"{where}: nested_quant_map is not bitsandbytes' signed dynamic map.")
  if nested and int(st.get("nested_blocksize", _blockwise.NESTED_BLOCKSIZE)) != _blockwise.NESTED_BLOCKSIZE:
    raise ValueError(f"{where}: nested_blocksize {st['nested_blocksize']} is not {_blockwise.NESTED_BLOCKSIZE}.")
  packed = np.ascontiguousarray(_np(entries[prefix])).view(np.uint8).reshape(-1)
  shapes = fmt.stored_shapes()
  storage = {"packed": packed, "absmax": _np(entries[f"{prefix}.absmax"]).reshape(-1)}
  if nested:
    storage["nested_absmax"] = _np(entries[f"{prefix}.nested_absmax"]).reshape(-1).astype(np.float32)
    storage["nested_offset"] = np.float32(st["nested_offset"])
  else:
    storage["absmax"] = storage["absmax"].astype(np.float32)
  for k, v in storage.items():
    if int(np.prod(shapes[k])) != v.size:
      raise ValueError(f"{where}: {k} holds {v.size} values, a [{out_n}, {in_n}] weight in blocks of "
                       f"{fmt.blocksize} needs {int(np.prod(shapes[k]))}.")
  return NF4Weight.from_storage({k: jnp.asarray(v.reshape(shapes[k])) for k, v in storage.items()}, fmt)


def stack(nodes: Sequence[NF4Weight]) -> NF4Weight:
  """Stacks same-format matrices on a new leading (layer) axis: the layout ``lax.scan`` slices.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> from jlora.quant import stack
    >>> q = jlora.quantize({"w": jnp.ones((128, 32))}, targets="w")["w"]
    >>> stack([q, q]).shape
    (2, 128, 32)
  """
  nodes = list(nodes)
  if not nodes or not all(isinstance(n, NF4Weight) for n in nodes):
    raise ValueError("stack: give a non-empty sequence of NF4Weight.")
  f = nodes[0].format
  for i, n in enumerate(nodes):
    if n.format != f:
      raise ValueError(f"stack: node {i} has format {n.format}, node 0 has {f}; stacked layers share one.")
  fmt = NF4Format(shape=(len(nodes), *f.shape), dtype=f.dtype, in_axes=tuple(a + 1 for a in f.in_axes),
                  stack=f.stack + 1, blocksize=f.blocksize, quant_type=f.quant_type, double_quant=f.double_quant,
                  compute_dtype=f.compute_dtype)
  return NF4Weight.from_storage({k: jnp.stack([n.storage[k] for n in nodes]) for k in f.stored_shapes()}, fmt)
