"""Pre-quantized bitsandbytes 4-bit checkpoints (``*-bnb-4bit``) in ``load`` / ``save``.

transformers saves a ``bnb.nn.Linear4bit`` weight as its packed codes under the
weight's name plus ``.absmax``, ``.quant_map``, ``.nested_absmax``,
``.nested_quant_map`` and ``.quant_state.bitsandbytes__<nf4|fp4>``, and writes a
``quantization_config`` into ``config.json``. Here each per-layer matrix becomes an
``NF4Weight`` (``jlora.quant.from_bnb``, exact bytes) and a stacked kernel's layers
are stacked into one ``(layers, in, out)`` node (``jlora.quant.stack``) that
``lax.scan`` slices; saving writes every entry back with ``jlora.quant.to_bnb``.
Everything else (embeddings, norms, biases, ``lm_head``) stays dense, as in
transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jlora.models.config import ModelConfig
from jlora.models.names import Param
from jlora.quant import NF4Weight, from_bnb, is_bnb_4bit, quant_state_keys, stack, to_bnb
from jlora.sharding import storage_specs

Readers = Mapping[str, Callable[[], np.ndarray]]


class _Lazy(Mapping):
  """A ``{name: array}`` view over checkpoint readers that reads an entry only when asked."""

  def __init__(self, readers: Readers, names: Iterable[str]):
    self._readers = readers
    self._names = [n for n in names if n in readers]

  def __getitem__(self, k):
    if k not in self._names:
      raise KeyError(k)
    return self._readers[k]()

  def __contains__(self, k):
    return k in self._names

  def __iter__(self):
    return iter(self._names)

  def __len__(self):
    return len(self._names)


def check_config(hf_config: Mapping[str, Any], directory: str, error: type[Exception]) -> None:
  """Refuses a ``quantization_config`` other than bitsandbytes 4-bit (or gpt-oss' MXFP4), naming it."""
  qc = hf_config.get("quantization_config")
  if not qc:
    return
  method = qc.get("quant_method", "bitsandbytes")
  if method == "mxfp4" and hf_config.get("model_type") == "gpt_oss":
    return  # its expert weights are decoded on load (jlora.models._mxfp4)
  if method != "bitsandbytes":
    raise error(f"{directory}: config.json's quantization_config uses quant_method {method!r}; jlora.models "
                "reads bitsandbytes 4-bit checkpoints (*-bnb-4bit) only. Load the unquantized model instead.")
  if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
    raise error(f"{directory}: this is a bitsandbytes 8-bit (LLM.int8) checkpoint; jlora.models reads 4-bit "
                "NF4/FP4 checkpoints (load_in_4bit) only. Load the unquantized model instead.")


def quant_entries(readers: Readers, weight_names: Iterable[str]) -> set[str]:
  """The checkpoint keys that belong to the 4-bit quant states of ``weight_names``."""
  out = set()
  for name in weight_names:
    out.update(k for k in quant_state_keys(name) if k in readers)
  return out


def is_quant_entry(name: str, tensors: Mapping[str, Any]) -> bool:
  """Whether checkpoint key ``name`` is (part of) a 4-bit weight rather than a dense tensor."""
  if is_bnb_4bit(tensors, name):
    return True
  base = name.split(".weight.", 1)[0] + ".weight" if ".weight." in name else None
  return base is not None and name in quant_state_keys(base)


def read_kernel(readers: Readers, p: Param, cfg: ModelConfig, dtype: Any, error: type[Exception],
                directory: str) -> NF4Weight | None:
  """The native kernel ``p`` as an ``NF4Weight`` when the checkpoint stores it in 4 bits, else None.

  A stacked kernel must be quantized in every layer, with one format.
  """
  names = p.hf_names(cfg.num_layers)
  quantized = [is_bnb_4bit(readers, n) for n in names]
  if not any(quantized):
    return None
  if p.experts:
    raise error(f"{directory}: {p.path!r} (routed experts) is stored in 4 bits; jlora.models reads 4-bit "
                "attention and dense-MLP kernels only. Load the unquantized model instead.")
  if not all(quantized):
    dense = [n for n, q in zip(names, quantized) if not q]
    raise error(f"{directory}: {p.path!r} is stored in 4 bits in some layers but not in {dense[:4]}; "
                "jlora stacks layers, which must share one format.")
  want = p.shape[1:] if p.stacked else p.shape
  nodes = []
  for name in names:
    try:
      node = from_bnb(_Lazy(readers, [name, *quant_state_keys(name)]), prefix=name)
    except ValueError as e:
      raise error(f"{directory}: {e}") from None
    if node.shape != want:
      raise error(f"{directory}: {name} is a 4-bit [{node.shape[1]}, {node.shape[0]}] weight, expected "
                  f"[{want[1]}, {want[0]}] for this config.")
    nodes.append(node)
  try:
    node = stack(nodes) if p.stacked else nodes[0]
  except ValueError as e:
    raise error(f"{directory}: {p.path!r}: {e}") from None
  return with_compute_dtype(node, dtype)


def with_compute_dtype(node: NF4Weight, dtype: Any) -> NF4Weight:
  """``node`` decoding to ``dtype`` in the apply path (its stored bytes and original dtype unchanged)."""
  import dataclasses

  name = jnp.dtype(dtype).name
  fmt = dataclasses.replace(node.format, compute_dtype=None if name == node.format.dtype else name)
  return NF4Weight.from_storage(node.storage, fmt)


def place(node: NF4Weight, sharding: Any) -> NF4Weight:
  """Puts a host ``NF4Weight`` onto devices, its stored arrays sharded like the dense kernel's ``sharding``."""
  if sharding is None:
    return jax.tree.map(jnp.asarray, node)
  mesh = sharding.mesh
  specs = storage_specs(node, sharding.spec, dict(mesh.shape))

  def put(x, spec):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, NamedSharding(mesh, spec), lambda idx: host[idx])

  return jax.tree.map(put, node, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def write_kernel(node: NF4Weight, p: Param, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """The bitsandbytes entries of every layer of kernel ``p`` (what transformers saves)."""
  names = p.hf_names(cfg.num_layers)
  want = p.shape
  if node.shape != want or node.format.stack != (1 if p.stacked else 0):
    raise ValueError(f"{p.path!r} is a 4-bit kernel of shape {node.shape}, expected {want} "
                     f"({'stacked over layers' if p.stacked else 'unstacked'}).")
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), node)
  out = {}
  for i, name in enumerate(names):
    out.update(to_bnb(host, index=(i,) if p.stacked else (), prefix=name))
  return out


def quantization_config(nodes: Mapping[str, NF4Weight], table: list[Param],
                        existing: Mapping[str, Any] | None) -> dict[str, Any]:
  """``config.json``'s ``quantization_config`` for a tree whose 4-bit kernels are ``nodes`` (by path).

  transformers quantizes every linear layer but ``lm_head`` on loading, so every
  other linear kernel must be 4-bit, with one format; a config read from the
  checkpoint is kept as it was when it describes the same format.
  """
  formats = {(n.format.quant_type, n.format.double_quant) for n in nodes.values()}
  if len(formats) != 1:
    raise ValueError(f"4-bit kernels of several formats {sorted(formats)}; a bitsandbytes checkpoint has one "
                     "(quant type, double quantization). Quantize them alike.")
  quant_type, double_quant = formats.pop()
  if "lm_head/kernel" in nodes:
    raise ValueError("'lm_head/kernel' is 4-bit: transformers keeps lm_head unquantized in a bitsandbytes "
                     "checkpoint. Exclude it when quantizing (or jlora.dequantize it before saving).")
  dense = [p.path for p in table if p.kind == "kernel" and p.path != "lm_head/kernel" and p.path not in nodes]
  if dense:
    raise ValueError(f"{dense[:3]} are not 4-bit while other linear kernels are: transformers would quantize "
                     "them on loading. Quantize every linear kernel but lm_head, or none.")
  if existing and existing.get("bnb_4bit_quant_type", "fp4") == quant_type and \
      bool(existing.get("bnb_4bit_use_double_quant", False)) == double_quant:
    return dict(existing)
  compute = next(iter(nodes.values())).format.decode_dtype
  return {
      "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": compute,
      "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": quant_type,
      "bnb_4bit_use_double_quant": double_quant, "llm_int8_enable_fp32_cpu_offload": False,
      "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
      "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
  }
