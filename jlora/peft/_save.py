"""Export: a jlora LoRA tree as a Hugging Face PEFT adapter directory.

Export writes only long-established ``LoraConfig`` keys (so older PEFT releases
and vLLM accept the file) and never folds the scaling into the weights.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jlora import _checkpoint as ck
from jlora._checkpoint import adapter_weights
from jlora._weight import LoraWeight, is_lora_weight
from jlora.peft import _variants
from jlora.peft._format import (CONFIG_NAME, FINGERPRINT_KEY, FUSED_LAYOUT_KEY, PREFIX, WEIGHTS_NAME, PeftFormatError,
                                check_fused_layout, fused_to_torch, nesting, torch_factors, write_safetensors)
from jlora.peft._mapping import ModuleMap


def save(directory: str, params: Any, *, base_model_name_or_path: str = "",
         module_map: ModuleMap | None = None, model_type: str | None = None,
         task_type: str = "CAUSAL_LM", adalora_config: Mapping[str, Any] | None = None,
         base_fingerprint: str | None = None, fused_layout: str | None = None) -> str:
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
    fused_layout: for routed experts stored as one 3-D parameter per layer (gpt-oss;
      ``ModuleMap.fused_experts``), written as PEFT ``target_parameters``: where
      ``lora_A`` sits, a choice the shapes cannot record (``down_proj`` is square on
      gpt-oss). ``"peft_swapped"``: what PEFT 0.21 loads on transformers 4.x (lora_A
      on the output side); ``"input_side"``: what transformers >= 5 and vLLM load.
      Required when there are such experts; recorded in the safetensors metadata.
      Per-expert ``nn.Linear`` experts (Mixtral, Qwen-MoE) are ordinary modules.
    base_fingerprint: ``jlora.fingerprint`` of the base if already computed
      (default: computed from ``params`` when they hold the base weights). It is stored in the
      ``__metadata__`` of ``adapter_model.safetensors`` (which PEFT and vLLM
      ignore) so that ``load`` can refuse another base.

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
  mm = module_map or ModuleMap.for_model_type(model_type)
  weights = adapter_weights(params)
  if not weights:
    raise ValueError("jlora.peft.save: the tree holds no adapters.")
  # PiSSA/OLoRA adapters (on a residual base) become plain ones on the original base.
  if any(_variants.exportable(w) is not w for w in weights.values()):
    # The rebuilt original base is exact only up to float rounding: record no fingerprint unless given.
    base_fingerprint = base_fingerprint or ""
    params = jax.tree.map(lambda x: _variants.exportable(x) if is_lora_weight(x) else x, params,
                          is_leaf=is_lora_weight)
    weights = adapter_weights(params)
  family = _variants.family(weights, where="jlora.peft.save")
  if family == "adalora":
    return _variants.save_adalora(directory, weights, mm, base_model_name_or_path=base_model_name_or_path,
                                  task_type=task_type, adalora_config=adalora_config,
                                  metadata=_header(params, weights, base_fingerprint))
  dora = family == "dora"
  # PEFT has one use_rslora flag per adapter: the majority's. A kernel with the other scaling (a
  # Rule(rslora=...)) keeps its scale through its alpha in alpha_pattern (scale = alpha'/r or alpha'/sqrt(r)).
  flags = [w.spec.rslora for w in weights.values()]
  use_rslora = 2 * sum(flags) > len(flags)
  dropout = max(w.spec.dropout for w in weights.values())
  tensors: dict[str, np.ndarray] = {}
  ranks: dict[str, int] = {}
  alphas: dict[str, float] = {}
  fused: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}  # module -> parameter -> (lora_A, lora_B)
  fused_ranks: dict[str, int] = {}
  for path, w in weights.items():
    if mm.is_fused(path):
      layout = check_fused_layout(fused_layout, "jlora.peft.save")
      if dora:
        raise PeftFormatError(f"jlora.peft.save: {path!r} is a DoRA adapter on experts stored as one 3-D parameter; "
                              "PEFT's target_parameters take plain LoRA only.")
      for idx, a, b in fused_factors(w, path):
        name = mm.to_module(path, idx)
        module, _, param = name.rpartition(".")
        if name in fused_ranks:
          raise ValueError(f"jlora.peft.save: {path!r} maps to parameter {name!r}, which another adapter already "
                           "uses; fix the ModuleMap.")
        fused.setdefault(module, {})[param] = fused_to_torch(a, b, layout)
        fused_ranks[name] = w.spec.rank
        alphas[name] = _peft_alpha(w, use_rslora)
      continue
    if w.spec.layout.embedding and mm.tied_embedding and re.fullmatch(mm.tied_embedding, path):
      raise PeftFormatError(
          f"jlora.peft.save: {path!r} is an input embedding tied to the output projection. jlora applies "
          "its adapter to both uses of the tied matrix (as a merge does), PEFT only to the lookup, so the "
          "exported adapter would compute something else. Export a merged model (jlora.hf) instead, or "
          "adapt an untied embedding.")
    for idx, a, b in torch_factors(w):
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
      alphas[module] = _peft_alpha(w, use_rslora)
  for module, by_param in fused.items():
    for param, key in nesting(module, list(by_param), mm.parameter_order).items():
      tensors[f"{PREFIX}{key}.lora_A.weight"], tensors[f"{PREFIX}{key}.lora_B.weight"] = by_param[param]
  every = {**ranks, **fused_ranks}
  r = collections.Counter(every.values()).most_common(1)[0][0]
  alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
  config = {
      "peft_type": "LORA",
      "task_type": task_type,
      "base_model_name_or_path": base_model_name_or_path,
      "r": r,
      "lora_alpha": alpha,
      "target_modules": sorted(ranks),
      # PEFT's target_parameters take no dropout (lora_dropout must be 0 there); it is a training setting only.
      "lora_dropout": 0.0 if fused else dropout,
      "bias": "none",
      "use_rslora": use_rslora,
      "use_dora": dora,
      "fan_in_fan_out": mm.fan_in_fan_out,
      "rank_pattern": {m: v for m, v in sorted(every.items()) if v != r},
      "alpha_pattern": {m: v for m, v in sorted(alphas.items()) if v != alpha},
      "init_lora_weights": True,
      "modules_to_save": None,
      "inference_mode": True,
  }
  header = _header(params, weights, base_fingerprint)
  if fused:
    config["target_parameters"] = sorted(fused_ranks)
    header[FUSED_LAYOUT_KEY] = fused_layout
  os.makedirs(directory, exist_ok=True)
  write_safetensors(tensors, os.path.join(directory, WEIGHTS_NAME), header)
  with open(os.path.join(directory, CONFIG_NAME), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return directory


def _peft_alpha(w: LoraWeight, use_rslora: bool) -> float:
  """The alpha that gives ``w`` its scale under the adapter's one ``use_rslora`` flag (alpha/r or alpha/sqrt(r))."""
  if w.spec.rslora == use_rslora:
    return w.spec.alpha
  return w.spec.scale * (math.sqrt(w.spec.rank) if use_rslora else w.spec.rank)


def fused_factors(w: LoraWeight, path: str):
  """Per layer: ``(layer index, a [E, in, r], b [E, r, out])`` of a stacked ``[..., E, in, out]`` expert kernel."""
  spec = w.spec
  nb = len(spec.batch_axes)
  if not nb or len(spec.in_axes) != 1 or len(spec.out_axes) != 1 or spec.in_axes[0] > spec.out_axes[0] or \
     spec.batch_axes[-1] > spec.in_axes[0]:
    raise PeftFormatError(f"jlora.peft.save: {path!r} (layout {spec.layout}) is not a stacked [..., experts, in, out] "
                          "kernel, the layout of a 3-D PEFT target parameter.")
  a = np.asarray(jax.device_get(w.a), np.float32)
  b = np.asarray(jax.device_get(w.b), np.float32)
  for idx in itertools.product(*(range(n) for n in a.shape[:nb - 1])):
    yield idx, a[idx], b[idx]


def _header(params: Any, weights: Mapping[str, LoraWeight], base_fingerprint: str | None) -> dict[str, str]:
  """The safetensors ``__metadata__``: the format and, when known, the base fingerprint."""
  header = {"format": "pt"}
  if base_fingerprint is None and all(w.w0 is not None for w in weights.values()):
    base_fingerprint = ck.fingerprint(params)
  if base_fingerprint:  # (an adapters-only tree cannot say which base it belongs to)
    header[FINGERPRINT_KEY] = base_fingerprint
  return header
