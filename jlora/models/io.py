"""Hugging Face model directories <-> native parameters, with the ``safetensors`` library only.

``load`` reads ``config.json`` and ``model.safetensors`` (or the shards listed
in ``model.safetensors.index.json``), reads every tensor once, transposes and
stacks it into the native tree, and optionally places each parameter straight
onto a device mesh. A weight the model needs that the checkpoint lacks (other
than a tied ``lm_head``), or a checkpoint tensor the model does not use, is an
error that names them: a silently half-initialised base must never be trained.

MoE checkpoints hold one tensor per expert (Mixtral, Qwen: ``...experts.{e}.w1.weight``)
or one 3-D tensor per layer (gpt-oss: ``...experts.gate_up_proj``, or its MXFP4
``_blocks`` / ``_scales``, decoded on load); both become stacked ``(L, E, in, out)``
kernels.

``save`` writes the same layout back (``config.json`` + safetensors, sharded
above ``max_shard_bytes``), which ``transformers.AutoModelForCausalLM`` loads.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import sharding as sharding_lib
from jlora._tree import leaves_with_paths
from jlora._weight import is_lora_weight
from jlora.hf import to_torch_state_dict
from jlora.models import _bnb as bnb
from jlora.models import _mxfp4 as mxfp4
from jlora.models.config import ModelConfig
from jlora.models.decoder import Decoder, Params, _nest
from jlora.models.names import param_table
from jlora.quant._weight import is_nf4

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
FLAX_WEIGHTS_NAME = "flax_model.msgpack"  # transformers 4.x Flax checkpoints are read too
# Checkpoint tensors that carry no weights (old Llama checkpoints saved RoPE buffers).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(ValueError):
  """A model directory that does not describe exactly the model its config names."""


def read_config(directory: str) -> ModelConfig:
  """Parses ``directory/config.json`` into a ``ModelConfig``.

  Example:
    >>> import json, os, tempfile
    >>> from jlora.models.io import read_config
    >>> d = tempfile.mkdtemp()
    >>> json.dump({"model_type": "gpt2"}, open(os.path.join(d, "config.json"), "w"))
    >>> read_config(d)
    Traceback (most recent call last):
    ...
    ValueError: config.json: model_type 'gpt2' is not supported by jlora.models; supported: llama, ...
  """
  path = os.path.join(directory, CONFIG_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory!r} has no {CONFIG_NAME} (a Hugging Face model directory is needed)")
  with open(path) as f:
    return ModelConfig.from_hf(json.load(f))


def _weight_files(directory: str) -> list[str]:
  index = os.path.join(directory, INDEX_NAME)
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
    if missing:
      raise FileNotFoundError(f"{index} lists shards that are not there: {missing}")
    return [os.path.join(directory, f) for f in files]
  single = os.path.join(directory, WEIGHTS_NAME)
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(os.path.join(directory, FLAX_WEIGHTS_NAME)):
    return [os.path.join(directory, FLAX_WEIGHTS_NAME)]
  others = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".msgpack", ".pt", ".pth")))
  hint = f" (found {others}: convert them to safetensors)" if others else ""
  raise FileNotFoundError(f"{directory!r} has no {WEIGHTS_NAME} or {INDEX_NAME}{hint}")


def _open_tensors(files: list[str]) -> dict[str, Callable[[], np.ndarray]]:
  """``{HF tensor name: reader}``; each reader returns the tensor (torch layout) when called."""
  from safetensors import safe_open

  if len(files) == 1 and files[0].endswith(".msgpack"):
    # transformers 4.x Flax checkpoints: the Flax tree, renamed and transposed to torch layout.
    from flax.serialization import msgpack_restore

    with open(files[0], "rb") as f:
      tensors = to_torch_state_dict(msgpack_restore(f.read()))
    return {k: (lambda v=v: v) for k, v in tensors.items()}
  readers = {}
  for path in files:
    handle = safe_open(path, framework="numpy")
    for k in handle.keys():
      readers[k] = functools.partial(handle.get_tensor, k)
  return readers


def _placement(params_shapes: Params, mesh, sharding):
  """``{path: jax.sharding.Sharding | None}`` from a preset name or ``(regex, PartitionSpec)`` rules."""
  if mesh is None:
    if sharding is not None:
      raise ValueError("jlora.models.load: sharding= needs a mesh= to place the parameters on.")
    return {}
  from jax.sharding import NamedSharding

  rules = sharding_lib.preset_rules(sharding or "fsdp", mesh) if isinstance(sharding, (str, type(None))) else sharding
  specs = sharding_lib.partition_specs(params_shapes, rules, mesh=mesh)
  return {p: NamedSharding(mesh, s) for p, s in leaves_with_paths(specs, is_leaf=lambda x: isinstance(
      x, jax.sharding.PartitionSpec))}


def load(directory: str, *, dtype: Any = "float32", mesh: jax.sharding.Mesh | None = None,
         sharding: str | Sequence[tuple[str, Any]] | None = None, remat: str = "none",
         attention: str = "auto", unroll_layers: bool = False, moe_dispatch: str = "auto") -> tuple[Decoder, Params]:
  """Loads a Hugging Face causal-LM directory as ``(Decoder, params)``.

  Args:
    directory: holds ``config.json`` and ``model.safetensors`` or a sharded
      ``model.safetensors.index.json`` (or, from transformers 4.x Flax classes,
      ``flax_model.msgpack``).
    dtype: dtype of the parameters, which is also the compute dtype
      (``"float32"`` or ``"bfloat16"``; the cast happens on the host).
    mesh: place every parameter directly onto this mesh (no full copy on one device).
    sharding: a ``jlora.sharding`` preset name (``"fsdp"`` default with a mesh,
      ``"tp"``, ``"fsdp_tp"``, ``"replicated"``) or ordered ``(regex, PartitionSpec)`` rules.
    remat, attention, unroll_layers, moe_dispatch: passed to ``Decoder``.

  Returns:
    ``(model, params)``.

  Raises:
    CheckpointError: weights missing from, or unexpected in, the checkpoint,
      or of the wrong shape (the message names them; a MoE checkpoint lacking
      one expert's tensor names that tensor).
    ValueError: an unsupported ``model_type`` (names the supported ones).

  Example:
    >>> import jax, tempfile, jlora.models
    >>> cfg = jlora.models.ModelConfig.from_hf({"model_type": "qwen3", "vocab_size": 64, "hidden_size": 32,
    ...   "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 8})
    >>> model = jlora.models.Decoder(cfg)
    >>> d = jlora.models.save(tempfile.mkdtemp(), model, model.init(jax.random.key(0)))
    >>> model2, params = jlora.models.load(d)
    >>> model2 == model, params["layers"]["self_attn"]["q_norm"]["scale"].shape
    (True, (2, 8))
  """
  cfg = read_config(directory)
  bnb.check_config(cfg.to_hf(), directory, CheckpointError)
  model = Decoder(cfg, remat=remat, attention=attention, unroll_layers=unroll_layers, moe_dispatch=moe_dispatch)
  dtype = jnp.dtype(dtype)
  table = param_table(cfg)
  readers = _open_tensors(_weight_files(directory))
  needed = {name for p in table for name in p.hf_names(cfg.num_layers)}
  packed = mxfp4.entries(readers, needed) if cfg.model_type == "gpt_oss" else {}  # gpt-oss MXFP4 experts
  packed_keys = {k for pair in packed.values() for k in pair}
  missing = sorted(n for n in needed if n not in readers and n not in packed)
  tied_extra = "lm_head.weight" if cfg.tie_embeddings and "lm_head.weight" in readers else None
  quant_state = bnb.quant_entries(readers, needed)  # of bitsandbytes 4-bit weights (*-bnb-4bit checkpoints)
  unexpected = sorted(k for k in readers if k not in needed and k != tied_extra and k not in quant_state
                      and k not in packed_keys and not k.endswith(_IGNORED_SUFFIXES))
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"{len(missing)} weights are missing: {_preview(missing)}")
    if unexpected:
      parts.append(f"{len(unexpected)} tensors are not weights of a {cfg.model_type} model with this config: "
                   f"{_preview(unexpected)}")
    raise CheckpointError(f"{directory}: " + "; ".join(parts) + ". The checkpoint does not match its "
                          "config.json; refusing to load a partly initialised model.")
  placement = _placement(model.shapes(dtype), mesh, sharding)

  def read(name: str, expected: tuple[int, ...], transpose: bool) -> np.ndarray:
    if name in packed:
      blocks, scales = (readers[k]() for k in packed[name])
      try:
        arr = mxfp4.decode(blocks, scales)
      except ValueError as e:
        raise CheckpointError(f"{directory}: {name}: {e}") from None
      if arr.shape != expected:
        raise CheckpointError(f"{directory}: {name} (MXFP4 {packed[name][0]} {blocks.shape}) decodes to "
                              f"{arr.shape}, expected {expected} for this config.")
      return arr.astype(dtype, copy=False)
    arr = readers[name]()
    if transpose:
      arr = arr.T
    if arr.shape != expected:
      raise CheckpointError(f"{directory}: {name} has shape {arr.shape[::-1] if transpose else arr.shape}, "
                            f"expected {expected[::-1] if transpose else expected} for this config.")
    return arr.astype(dtype, copy=False)

  flat = {}
  for p in table:
    transpose = p.kind == "kernel" and p.hf_transposed
    q = bnb.read_kernel(readers, p, cfg, dtype, CheckpointError, directory) if transpose and quant_state else None
    if q is not None:  # stored in 4 bits: an NF4Weight with the checkpoint's bytes, decoded to `dtype`
      flat[p.path] = bnb.place(q, placement.get(p.path))
      continue
    if p.stacked:  # one HF tensor per layer (per layer and expert): stacked on the host
      host = np.empty(p.shape, dtype)
      lead = p.shape[:p.slice_ndim]
      for n, name in enumerate(p.hf_names(cfg.num_layers)):
        host[np.unravel_index(n, lead)] = read(name, p.shape[p.slice_ndim:], transpose)
    else:
      host = np.ascontiguousarray(read(p.hf_name, p.shape, transpose))
    flat[p.path] = _place(host, placement.get(p.path))
  if tied_extra:
    lm = readers[tied_extra]()
    emb = np.asarray(jax.device_get(flat["embed_tokens/embedding"]))
    if lm.shape != emb.shape or not np.array_equal(lm.astype(dtype), emb):
      raise CheckpointError(f"{directory}: config.json ties the embeddings (tie_word_embeddings) but the checkpoint "
                            "holds a different lm_head.weight; set tie_word_embeddings=false to use it.")
  return model, _nest(flat)


def _place(host: np.ndarray, sharding) -> jax.Array:
  if sharding is None:
    return jnp.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _preview(names: list[str], n: int = 8) -> str:
  return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def to_hf_tensors(model: Decoder, params: Params) -> dict[str, np.ndarray]:
  """``{HF name: array}`` (torch layout, parameter dtype) of a plain parameter tree.

  4-bit kernels (``jlora.NF4Weight``) give bitsandbytes' entries per layer
  (``weight`` packed, ``weight.absmax``, ..., as transformers saves them).

  Example:
    >>> import jax
    >>> from jlora.models import Decoder, ModelConfig
    >>> from jlora.models.io import to_hf_tensors
    >>> cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
    ...   "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4})
    >>> to_hf_tensors(Decoder(cfg), Decoder(cfg).init(jax.random.key(0)))["lm_head.weight"].shape
    (64, 32)
  """
  flat = {}
  for path, leaf in leaves_with_paths(params, is_leaf=lambda x: is_lora_weight(x) or is_nf4(x)):
    if is_lora_weight(leaf):
      raise ValueError(f"{path!r} holds an adapter: save jlora.merge(params) (a merged model) instead")
    flat[path] = leaf
  table = param_table(model.config)
  want = {p.path for p in table}
  if set(flat) != want:
    extra, missing = sorted(set(flat) - want), sorted(want - set(flat))
    raise ValueError(f"params do not fit this {model.config.model_type} model: missing {missing}, extra {extra}")
  out = {}
  for p in table:
    if is_nf4(flat[p.path]):
      out.update(bnb.write_kernel(flat[p.path], p, model.config))
      continue
    arr = np.asarray(jax.device_get(flat[p.path]))
    if arr.shape != p.shape:
      raise ValueError(f"{p.path!r} has shape {arr.shape}, expected {p.shape}")
    names = p.hf_names(model.config.num_layers)
    slices = list(arr.reshape(-1, *p.shape[p.slice_ndim:])) if p.stacked else [arr]
    for name, s in zip(names, slices):
      out[name] = np.ascontiguousarray(s.T if p.kind == "kernel" and p.hf_transposed else s)
  return out


def save(directory: str, model: Decoder, params: Params, *, max_shard_bytes: int = 5 * 2**30,
         config_overrides: dict[str, Any] | None = None) -> str:
  """Writes a Hugging Face model directory: ``config.json`` + safetensors in torch layout.

  ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` loads it (bfloat16
  parameters are written as bfloat16); ``load(directory)`` gives back exactly
  ``params``. MoE experts are written in the checkpoint's own layout (one tensor
  per expert, or gpt-oss' 3-D tensors); a gpt-oss read from MXFP4 is written
  dense (its decoded kernels, in the parameters' dtype, without
  ``quantization_config``), which transformers loads as a plain model.
  Parameters must be plain arrays (``jlora.merge`` an adapted tree first)
  that this process can read in full, or 4-bit ``jlora.NF4Weight`` kernels: then
  the directory is a bitsandbytes ``*-bnb-4bit`` checkpoint (every linear kernel
  but ``lm_head`` 4-bit, one format; ``quantization_config`` in ``config.json``)
  that transformers loads with bitsandbytes, and a checkpoint read by ``load``
  is written back byte for byte.

  Args:
    directory: output directory (created).
    model: the ``Decoder``.
    params: its parameters.
    max_shard_bytes: above this, weights go to several ``model-0000i-of-0000n.safetensors``
      files plus ``model.safetensors.index.json``.
    config_overrides: keys to set in the written ``config.json``.

  Returns:
    The directory.

  Example:
    >>> import jax, os, tempfile, jlora.models
    >>> cfg = jlora.models.ModelConfig.from_hf({"model_type": "mistral", "vocab_size": 64, "hidden_size": 32,
    ...   "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4, "sliding_window": 8})
    >>> m = jlora.models.Decoder(cfg)
    >>> sorted(os.listdir(jlora.models.save(tempfile.mkdtemp(), m, m.init(jax.random.key(0)))))
    ['config.json', 'model.safetensors']
  """
  from safetensors.numpy import save_file

  tensors = to_hf_tensors(model, params)
  quantized = {p: x for p, x in leaves_with_paths(params, is_leaf=is_nf4) if is_nf4(x)}
  config = model.config.to_hf() or {}
  if quantized:
    config["quantization_config"] = bnb.quantization_config(quantized, param_table(model.config),
                                                            config.get("quantization_config"))
  else:  # e.g. a merged (dense) model of a 4-bit checkpoint
    config.pop("quantization_config", None)
  os.makedirs(directory, exist_ok=True)
  dense = [a for name, a in tensors.items() if not bnb.is_quant_entry(name, tensors)]
  dtypes = {a.dtype.name for a in dense if np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"}
  if len(dtypes) == 1:
    config["dtype"] = dtypes.pop()
    if "torch_dtype" in config:
      config["torch_dtype"] = config["dtype"]
  config.setdefault("architectures", [_ARCHITECTURES[model.config.model_type]])
  config.update(config_overrides or {})
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, arr in tensors.items():
    if shards[-1] and size + arr.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = arr
    size += arr.nbytes
  if len(shards) == 1:
    save_file(shards[0], os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
  else:
    weight_map = {}
    for i, shard in enumerate(shards, 1):
      fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(directory, fname), metadata={"format": "pt"})
      weight_map.update({k: fname for k in shard})
    with open(os.path.join(directory, INDEX_NAME), "w") as f:
      json.dump({"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
                 "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(directory, CONFIG_NAME), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return directory


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM", "gpt_oss": "GptOssForCausalLM",
}
