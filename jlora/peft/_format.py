"""Hugging Face PEFT adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``.

Export writes only long-established ``LoraConfig`` keys (so older PEFT releases
and vLLM accept the file) and never folds the scaling into the weights. Import
refuses every PEFT feature jlora does not reproduce, instead of loading part of
an adapter.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jlora._checkpoint import adapter_weights
from jlora._tree import leaves_with_paths, path_str
from jlora._weight import LoraSpec, LoraWeight, is_lora_weight
from jlora.peft import _variants
from jlora.peft._mapping import ModuleMap

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_E|lora_embedding_A|"
                  r"lora_embedding_B|lora_magnitude_vector)(?:\.(?P<adapter>[^.]+))?(?P<suffix>\.weight)?$")


class PeftFormatError(ValueError):
  """A PEFT directory jlora cannot load faithfully (the message says what and why)."""


def _to_torch(w: LoraWeight) -> list[tuple[tuple[int, ...], np.ndarray, np.ndarray]]:
  """Per stacked index: (index, lora_A (r, in), lora_B (out, r)) as float32 NumPy arrays."""
  spec = w.spec
  a = np.asarray(jax.device_get(w.a), np.float32)
  b = np.asarray(jax.device_get(w.b), np.float32)
  nb = len(spec.batch_axes)
  batch_shape = a.shape[:nb]
  out = []
  for idx in itertools.product(*(range(n) for n in batch_shape)):
    ai = a[idx].reshape(-1, spec.rank)  # (in_prod, r), row-major over the input axes
    bi = b[idx].reshape(spec.rank, -1)  # (r, out_prod)
    out.append((idx, np.ascontiguousarray(ai.T), np.ascontiguousarray(bi.T)))
  return out


def save(directory: str, params: Any, *, base_model_name_or_path: str = "",
         module_map: ModuleMap | None = None, model_type: str | None = None,
         task_type: str = "CAUSAL_LM", adalora_config: Mapping[str, Any] | None = None) -> str:
  """Writes the adapters of ``params`` as a PEFT LoRA directory.

  ``PeftModel.from_pretrained(torch_model, directory)`` then loads it onto the
  matching PyTorch model (and vLLM can serve it).

  Args:
    directory: output directory (created).
    params: a LoRA tree from ``jlora.init`` / training.
    base_model_name_or_path: written to the config (the PyTorch base to load).
    module_map: Flax path -> torch module names; default: the built-in map
      for ``model_type`` (transformers' own models).
    model_type: transformers ``config.model_type`` selecting the built-in map.
    task_type: PEFT task type.
    adalora_config: AdaLoRA only: ``AdaLoraConfig`` schedule fields to record
      (``target_r``, ``total_step``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1``,
      ``beta2``, ``orth_reg_weight``); the rank pattern comes from the adapters.

  DoRA adapters are written with ``use_dora`` and ``lora_magnitude_vector``;
  PiSSA/OLoRA adapters (``jlora.variants.Residual``) as the equivalent plain
  LoRA of rank 2r on the original base (PEFT's ``subtract_mutated_init``);
  AdaLoRA adapters as a PEFT ``ADALORA`` directory with their ``rank_pattern``.

  Returns:
    The directory written.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, jlora.peft, tempfile, json, os
    >>> p = {"model": {"layers": {"0": {"q_proj": {"kernel": jnp.ones((8, 8))}}}}}
    >>> lp = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=2, alpha=4, targets=".*q_proj/kernel"))
    >>> d = jlora.peft.save(tempfile.mkdtemp(), lp, base_model_name_or_path="my/base")
    >>> json.load(open(os.path.join(d, "adapter_config.json")))["target_modules"]
    ['model.layers.0.q_proj']
  """
  from safetensors.numpy import save_file

  mm = module_map or ModuleMap.for_model_type(model_type)
  weights = adapter_weights(params)
  if not weights:
    raise ValueError("jlora.peft.save: the tree holds no adapters.")
  # PiSSA/OLoRA adapters (on a residual base) become plain ones on the original base.
  weights = {p: _variants.exportable(w) for p, w in weights.items()}
  family = _variants.family(weights, where="jlora.peft.save")
  if family == "adalora":
    return _variants.save_adalora(directory, weights, mm, base_model_name_or_path=base_model_name_or_path,
                                  task_type=task_type, adalora_config=adalora_config)
  dora = family == "dora"
  rslora = {w.spec.rslora for w in weights.values()}
  if len(rslora) > 1:
    raise ValueError("jlora.peft.save: PEFT has one use_rslora flag per adapter; this tree mixes both scalings.")
  dropout = max(w.spec.dropout for w in weights.values())
  tensors: dict[str, np.ndarray] = {}
  ranks: dict[str, int] = {}
  alphas: dict[str, float] = {}
  for path, w in weights.items():
    if w.spec.layout.embedding and mm.tied_embedding and re.fullmatch(mm.tied_embedding, path):
      raise PeftFormatError(
          f"jlora.peft.save: {path!r} is an input embedding tied to the output projection. jlora applies "
          "its adapter to both uses of the tied matrix (as a merge does), PEFT only to the lookup, so the "
          "exported adapter would compute something else. Export a merged model (jlora.hf) instead, or "
          "adapt an untied embedding.")
    for idx, a, b in _to_torch(w):
      module = mm.to_module(path, idx)
      if module in ranks:
        raise ValueError(f"jlora.peft.save: {path!r} maps to module {module!r}, which another adapter "
                         "already uses; fix the ModuleMap.")
      if w.spec.layout.embedding:
        tensors[f"{PREFIX}{module}.lora_embedding_A"] = a
        tensors[f"{PREFIX}{module}.lora_embedding_B"] = b
      else:
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b
      if dora:
        tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = _variants.magnitude_at(w, idx)
      ranks[module] = w.spec.rank
      alphas[module] = w.spec.alpha
  r = collections.Counter(ranks.values()).most_common(1)[0][0]
  alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
  config = {
      "peft_type": "LORA",
      "task_type": task_type,
      "base_model_name_or_path": base_model_name_or_path,
      "r": r,
      "lora_alpha": alpha,
      "target_modules": sorted(ranks),
      "lora_dropout": dropout,
      "bias": "none",
      "use_rslora": rslora.pop(),
      "use_dora": dora,
      "fan_in_fan_out": mm.fan_in_fan_out,
      "rank_pattern": {m: v for m, v in sorted(ranks.items()) if v != r},
      "alpha_pattern": {m: v for m, v in sorted(alphas.items()) if v != alpha},
      "init_lora_weights": True,
      "modules_to_save": None,
      "inference_mode": True,
  }
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
  with open(os.path.join(directory, CONFIG_NAME), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return directory


# -----------------------------------------------------------------------------
# Import
# -----------------------------------------------------------------------------

_UNSUPPORTED = {
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "lora_bias": "LoRA biases (lora_bias=true)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "trainable_token_indices": "trainable_token_indices",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "aLoRA",
}


def _pattern_value(patterns: Mapping[str, Any], module: str, default):
  # PEFT: the first key k with re.match(rf"(.*\.)?({k})$", module_name).
  for key, value in patterns.items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def read_config(directory: str) -> dict:
  path = os.path.join(directory, CONFIG_NAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory!r} has no {CONFIG_NAME}")
  with open(path) as f:
    config = json.load(f)
  if config.get("peft_type") not in ("LORA", "ADALORA"):
    raise PeftFormatError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; jlora loads LoRA "
                          "(plain or DoRA) and AdaLoRA adapters")
  for key, what in _UNSUPPORTED.items():
    if config.get(key):
      raise PeftFormatError(f"{path}: {what} is not supported by jlora; refusing a partial load")
  if config.get("bias", "none") != "none":
    raise PeftFormatError(f"{path}: bias={config['bias']!r} trains the base biases, which jlora does not "
                          "load; only bias='none' adapters are supported")
  if config.get("layers_to_transform") is not None:
    pass  # the saved tensors already cover exactly the transformed layers
  return config


def load(directory: str, params: Any, *, module_map: ModuleMap | None = None,
         model_type: str | None = None, layout: Mapping[str, Any] | None = None) -> Any:
  """Loads a PEFT LoRA directory onto Flax base ``params`` as a jlora tree.

  Per-module ranks and alphas (``rank_pattern`` / ``alpha_pattern``),
  rsLoRA scaling, DoRA (``use_dora``) and AdaLoRA directories (``ADALORA``,
  with their ``rank_pattern``) are honoured; the result's ``jlora.wrap``
  output matches the PEFT model's.

  Args:
    directory: a directory written by PEFT's ``save_pretrained`` (or ``jlora.peft.save``).
    params: the Flax base parameters.
    module_map: Flax path <-> torch module names (default: built-in for ``model_type``).
    model_type: transformers ``config.model_type``.
    layout: optional ``jlora.infer_layout`` result; overrides ``module_map``'s
      orientation knowledge for the kernels it lists.

  Raises:
    PeftFormatError: an unsupported PEFT feature, a tensor that matches no base
      parameter, or a shape mismatch (each names the key).
  """
  from safetensors.numpy import load_file

  config = read_config(directory)
  wpath = os.path.join(directory, WEIGHTS_NAME)
  if not os.path.exists(wpath):
    if os.path.exists(os.path.join(directory, "adapter_model.bin")):
      raise PeftFormatError(f"{directory!r} holds adapter_model.bin (pickle); re-save it with PEFT's "
                            "safe_serialization=True to get adapter_model.safetensors")
    raise FileNotFoundError(f"{directory!r} has no {WEIGHTS_NAME}")
  tensors = load_file(wpath)
  mm = module_map or ModuleMap.for_model_type(model_type)

  candidates: dict[str, tuple[str, Any]] = {}
  for path, leaf in leaves_with_paths(params, is_leaf=is_lora_weight):
    if is_lora_weight(leaf):
      raise PeftFormatError(f"{path!r} already holds an adapter; load onto plain base params")
    if len(getattr(leaf, "shape", ())) >= 2 and path.rsplit("/", 1)[-1] in ("kernel", "embedding"):
      try:
        candidates[mm.to_module(path, ())] = (path, leaf)
      except ValueError:
        continue

  parts: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  for key, value in tensors.items():
    m = _KEY.match(key)
    if not m:
      raise PeftFormatError(f"{wpath}: tensor {key!r} is not a LoRA A/B weight; jlora cannot load it")
    parts[m.group("module")][m.group("kind")] = value

  use_rslora = bool(config.get("use_rslora", False))
  replacements: dict[str, LoraWeight] = {}
  for module, kinds in sorted(parts.items()):
    if module not in candidates:
      near = [c for c in candidates if c.endswith(module.split(".")[-1])][:3]
      raise PeftFormatError(f"{wpath}: module {module!r} matches no Flax parameter"
                            + (f" (similar: {near})" if near else "") + "; pass the right model_type or a ModuleMap")
    path, leaf = candidates[module]
    embedding = "lora_embedding_A" in kinds
    a_t = kinds.get("lora_embedding_A" if embedding else "lora_A")
    b_t = kinds.get("lora_embedding_B" if embedding else "lora_B")
    if a_t is None or b_t is None:
      raise PeftFormatError(f"{wpath}: module {module!r} has only {sorted(kinds)}; both A and B are needed")
    r = a_t.shape[0]
    lay = (layout or {}).get(path) or mm.layout_for(path, len(leaf.shape), embedding)
    lay = lay.normalized(len(leaf.shape))
    if config["peft_type"] == "ADALORA":
      replacements[path] = _variants.load_adalora_module(config, wpath, module, kinds, path, leaf, lay)
      continue
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    spec = LoraSpec(shape=tuple(leaf.shape), layout=lay, rank=int(r), alpha=alpha, rslora=use_rslora,
                    dropout=float(config.get("lora_dropout", 0.0) or 0.0),
                    variant=_variants.dora_variant() if config.get("use_dora") else _variants.plain_variant())
    want_r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", r))
    if int(want_r) != r:
      raise PeftFormatError(f"{wpath}: {module!r} has rank {r} but the config says {want_r}")
    in_prod = int(np.prod([spec.shape[i] for i in spec.in_axes]))
    out_prod = int(np.prod([spec.shape[i] for i in spec.out_axes]))
    if a_t.shape != (r, in_prod) or b_t.shape != (out_prod, r):
      raise PeftFormatError(
          f"{wpath}: {module!r}: A {a_t.shape} / B {b_t.shape} do not fit Flax parameter {path!r} of shape "
          f"{spec.shape} (expected A ({r}, {in_prod}) and B ({out_prod}, {r}))")
    a = np.ascontiguousarray(a_t.T).reshape(spec.a_shape).astype(np.float32)
    b = np.ascontiguousarray(b_t.T).reshape(spec.b_shape).astype(np.float32)
    extras = _variants.dora_extras(spec, kinds, wpath, module) if config.get("use_dora") else {}
    replacements[path] = LoraWeight(leaf, jax.numpy.asarray(a), jax.numpy.asarray(b), spec, extras)

  def replace(p, leaf):
    return replacements.get(path_str(p), leaf)

  return jax.tree_util.tree_map_with_path(replace, params)
