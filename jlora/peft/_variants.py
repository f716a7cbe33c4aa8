"""The PEFT file format of the LoRA variants: DoRA (``use_dora``, ``lora_magnitude_vector``),
AdaLoRA (``peft_type: ADALORA``, ``lora_A``/``lora_E``/``lora_B``, ``rank_pattern``) and the
conversion of PiSSA/OLoRA adapters to plain LoRA on the original base."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jlora._variant import PLAIN, Variant
from jlora._weight import LoraSpec, LoraWeight
from jlora.peft._format import CONFIG_NAME, PREFIX, WEIGHTS_NAME, PeftFormatError, torch_factors, write_safetensors
from jlora.variants import AdaLoRA, DoRA
from jlora.variants import _residual


def exportable(w: LoraWeight) -> LoraWeight:
  """PiSSA/OLoRA adapters as plain (or DoRA) adapters of rank 2r on the original base."""
  return _residual.to_plain(w) if isinstance(w.spec.variant, _residual.Residual) else w


def family(weights: Mapping[str, LoraWeight], *, where: str) -> str:
  """``"lora"``, ``"dora"`` or ``"adalora"``: one PEFT directory holds one kind."""
  kinds = {("dora" if isinstance(w.spec.variant, DoRA) else
            "adalora" if isinstance(w.spec.variant, AdaLoRA) else
            "lora" if type(w.spec.variant) is Variant else w.spec.variant.name) for w in weights.values()}
  unknown = kinds - {"lora", "dora", "adalora"}
  if unknown:
    raise PeftFormatError(f"{where}: PEFT has no format for {sorted(unknown)} adapters.")
  if len(kinds) > 1:
    raise PeftFormatError(f"{where}: a PEFT adapter is one kind ({' / '.join(sorted(kinds))} adapters are mixed here); "
                 "export them separately.")
  return kinds.pop()


def magnitude_at(w: LoraWeight, idx: tuple[int, ...]) -> np.ndarray:
  """DoRA's magnitude of one (stacked) module, flattened over the output axes like ``[out]``."""
  m = np.asarray(jax.device_get(w.factors["magnitude"]), np.float32)
  return np.ascontiguousarray(m[idx].reshape(-1))


def dora_variant() -> Variant:
  return DoRA()


def plain_variant() -> Variant:
  return PLAIN


def dora_magnitude(kinds: Mapping[str, np.ndarray], shape: tuple[int, ...], wpath: str, module: str) -> np.ndarray:
  """One module's ``lora_magnitude_vector`` reshaped to ``shape`` (the kernel's output axes)."""
  m = kinds.get("lora_magnitude_vector")
  if m is None:
    raise PeftFormatError(f"{wpath}: use_dora is set but module {module!r} has no lora_magnitude_vector.")
  if m.size != int(np.prod(shape)):
    raise PeftFormatError(f"{wpath}: {module!r}: lora_magnitude_vector has {m.size} values, the kernel has "
                 f"{int(np.prod(shape))} output features.")
  return np.asarray(m, np.float32).reshape(shape)


# -- AdaLoRA --------------------------------------------------------------------------------------

_ADALORA_DEFAULTS = {"target_r": 8, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85,
                     "orth_reg_weight": 0.5, "total_step": 1}


def save_adalora(directory: str, weights: Mapping[str, LoraWeight], mm, *, base_model_name_or_path: str,
                 task_type: str, adalora_config: Mapping[str, Any] | None,
                 metadata: Mapping[str, str] | None = None) -> str:
  """Writes AdaLoRA adapters as PEFT does after training: kept ranks only, with ``rank_pattern``."""
  extra = dict(adalora_config or {})
  unknown = set(extra) - set(_ADALORA_DEFAULTS)
  if unknown:
    raise ValueError(f"jlora.peft.save: unknown adalora_config keys {sorted(unknown)}; known: "
                     f"{sorted(_ADALORA_DEFAULTS)}.")
  init_rs = {w.spec.rank for w in weights.values()}
  alphas = {w.spec.alpha for w in weights.values()}
  if len(init_rs) > 1 or len(alphas) > 1:
    raise ValueError("jlora.peft.save: PEFT's AdaLoRA has one init_r and one lora_alpha for all modules; "
                     f"these adapters have ranks {sorted(init_rs)} and alphas {sorted(alphas)}.")
  tensors: dict[str, np.ndarray] = {}
  pattern: dict[str, list[bool]] = {}
  for path, w in weights.items():
    if w.spec.layout.embedding:
      raise PeftFormatError(f"jlora.peft.save: {path!r} is an embedding; PEFT's AdaLoRA adapts Linear/Conv1D "
                            "layers only.")
    keep = np.asarray(jax.device_get(w.factors["rank_mask"])) > 0
    e = np.asarray(jax.device_get(w.factors["e"]), np.float32)
    for idx, a, b in torch_factors(w):
      module = mm.to_module(path, idx)
      k = keep[idx]
      tensors[f"{PREFIX}{module}.lora_A"] = np.ascontiguousarray(a[k])
      tensors[f"{PREFIX}{module}.lora_E"] = np.ascontiguousarray(e[idx][k].reshape(-1, 1))
      tensors[f"{PREFIX}{module}.lora_B"] = np.ascontiguousarray(b[:, k])
      pattern[f"{module}.lora_E"] = [bool(x) for x in k]
  init_r = init_rs.pop()
  config = {
      "peft_type": "ADALORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
      "init_r": init_r, "lora_alpha": alphas.pop(), "lora_dropout": max(w.spec.dropout for w in weights.values()),
      "target_modules": sorted({k[: -len(".lora_E")] for k in pattern}), "bias": "none",
      "fan_in_fan_out": mm.fan_in_fan_out, "init_lora_weights": True, "modules_to_save": None,
      "inference_mode": True, "rank_pattern": pattern, **_ADALORA_DEFAULTS, **extra,
  }
  os.makedirs(directory, exist_ok=True)
  write_safetensors(tensors, os.path.join(directory, WEIGHTS_NAME), dict(metadata or {"format": "pt"}))
  with open(os.path.join(directory, CONFIG_NAME), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return directory


def adalora_slice(config: Mapping[str, Any], wpath: str, module: str, kinds: Mapping[str, np.ndarray],
                  path: str, leaf: Any, lay) -> tuple[LoraSpec, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """One PEFT AdaLoRA module as ``(spec, a, b, e, rank_mask)`` of a jlora AdaLoRA adapter of rank
  ``init_r`` (kept ranks placed by pattern); for a stacked kernel, the arrays are one layer's slice."""
  missing = [k for k in ("lora_A", "lora_E", "lora_B") if k not in kinds]
  if missing:
    raise PeftFormatError(f"{wpath}: AdaLoRA module {module!r} lacks {missing}.")
  init_r = int(config.get("init_r", 12))
  alpha = float(config.get("lora_alpha", 8))
  alpha = alpha if alpha > 0 else float(init_r)
  spec = LoraSpec(shape=tuple(leaf.shape), layout=lay, rank=init_r, alpha=alpha,
                  dropout=float(config.get("lora_dropout", 0.0) or 0.0), variant=AdaLoRA())
  a_t, e_t, b_t = kinds["lora_A"], kinds["lora_E"].reshape(-1), kinds["lora_B"]
  k = a_t.shape[0]
  patterns = config.get("rank_pattern") or {}
  keep = patterns.get(f"{module}.lora_E")
  keep = np.ones(init_r, bool) if keep is None else np.asarray(keep, bool)
  if keep.shape != (init_r,) or int(keep.sum()) != k or e_t.shape != (k,) or b_t.shape[1] != k:
    raise PeftFormatError(f"{wpath}: AdaLoRA module {module!r}: {k} saved ranks (A {a_t.shape}, E {e_t.shape}, "
                 f"B {b_t.shape}) do not fit init_r={init_r} with rank_pattern keeping {int(keep.sum())}.")
  if a_t.shape[1] != spec.fan_in or b_t.shape[0] != spec.fan_out:
    raise PeftFormatError(f"{wpath}: {module!r}: A {a_t.shape} / B {b_t.shape} do not fit Flax parameter {path!r} "
                 f"of shape {spec.shape}.")
  a_full = np.zeros((init_r, spec.fan_in), np.float32)
  b_full = np.zeros((spec.fan_out, init_r), np.float32)
  e_full = np.zeros(init_r, np.float32)
  a_full[keep], b_full[:, keep], e_full[keep] = a_t, b_t, e_t
  nb = len(spec.batch_axes)
  a = np.ascontiguousarray(a_full.T).reshape(spec.a_shape[nb:])
  b = np.ascontiguousarray(b_full.T).reshape(spec.b_shape[nb:])
  return spec, a, b, e_full, keep.astype(np.float32)
