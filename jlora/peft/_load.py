"""Import: a Hugging Face PEFT adapter directory onto Flax base parameters, as a jlora tree.

Import refuses every PEFT feature jlora does not reproduce, instead of loading
part of an adapter, and checks the base fingerprint ``jlora.peft.save``
recorded.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jlora import _checkpoint as ck
from jlora._tree import leaves_with_paths, path_str
from jlora._weight import LoraSpec, LoraWeight, is_lora_weight
from jlora.peft import _variants
from jlora.peft._format import (CONFIG_NAME, FINGERPRINT_KEY, FUSED_LAYOUT_KEY, TENSOR_KEY, WEIGHTS_NAME,
                                PeftFormatError, UnverifiedBaseWarning, check_fused_layout, fused_from_torch,
                                fused_shapes, nesting)
from jlora.peft._mapping import ModuleMap


_UNSUPPORTED = {
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "lora_bias": "LoRA biases (lora_bias=true)",
    "layer_replication": "layer_replication",
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


def read_base_fingerprint(directory: str) -> str | None:
  """The base model's ``jlora.fingerprint`` recorded by ``jlora.peft.save``; None if absent.

  Adapters saved by PEFT itself (or by jlora before it recorded one) have none.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, jlora.peft, tempfile
    >>> base = {"model": {"layers": {"0": {"q_proj": {"kernel": jnp.ones((8, 8))}}}}}
    >>> lp = jlora.init(jax.random.key(0), base, jlora.LoraConfig(rank=2, targets=".*q_proj/kernel"))
    >>> d = jlora.peft.save(tempfile.mkdtemp(), lp)
    >>> jlora.peft.read_base_fingerprint(d) == jlora.fingerprint(base)
    True
  """
  from safetensors import safe_open

  wpath = os.path.join(directory, WEIGHTS_NAME)
  if not os.path.exists(wpath):
    raise FileNotFoundError(f"{directory!r} has no {WEIGHTS_NAME}")
  with safe_open(wpath, "np") as f:
    metadata = f.metadata() or {}
  return metadata.get(FINGERPRINT_KEY) or None


_warned_unverified: set[str] = set()


def verify_base(directory: str, params: Any, *, fix: str = ck.TRANSPLANT_FIX) -> bool:
  """Checks that ``params`` is the base the PEFT adapter in ``directory`` was exported from.

  Args:
    directory: a PEFT adapter directory.
    params: the Flax base parameters it is about to be loaded onto.
    fix: the end of the mismatch message: what the caller's user can do.

  Returns:
    True if the recorded fingerprint matches; False if the adapter records
    none (then an ``UnverifiedBaseWarning`` is issued, once per directory).

  Raises:
    jlora.AdapterMismatchError: the recorded fingerprint is another base's
      (the message names both fingerprints and ``fix``).

  Example:
    >>> import jax, jax.numpy as jnp, jlora, jlora.peft, tempfile
    >>> base = {"model": {"layers": {"0": {"q_proj": {"kernel": jnp.ones((8, 8))}}}}}
    >>> lp = jlora.init(jax.random.key(0), base, jlora.LoraConfig(rank=2, targets=".*q_proj/kernel"))
    >>> d = jlora.peft.save(tempfile.mkdtemp(), lp)
    >>> jlora.peft.verify_base(d, base)
    True
  """
  recorded = read_base_fingerprint(directory)
  if recorded is None:
    key = os.path.abspath(directory)
    if key not in _warned_unverified:
      _warned_unverified.add(key)
      warnings.warn(f"PEFT adapter {directory!r} records no base-model fingerprint (it was not exported by "
                    "jlora), so jlora cannot verify that it is loaded onto the base it was trained on; make "
                    "sure it is.", UnverifiedBaseWarning, stacklevel=2)
    return False
  base = read_config(directory).get("base_model_name_or_path") or ""
  ck.verify_base({"base_fingerprint": recorded, "base_model": base}, params, where=f"PEFT adapter {directory!r}",
                 fix=fix)
  return True


def load(directory: str, params: Any, *, module_map: ModuleMap | None = None,
         model_type: str | None = None, layout: Mapping[str, Any] | None = None,
         check_base: bool = True, fused_layout: str | None = None) -> Any:
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
    layout: optional ``jlora.infer_layout`` result (or a model's own layout);
      overrides ``module_map``'s orientation knowledge for the kernels it lists.
      Kernels stacked along batch axes (scanned layers) are filled slice by
      slice from the modules ``module_map.to_module(path, index)`` names; slices
      the adapter does not cover keep A = B = 0.
    check_base: compare the base fingerprint ``jlora.peft.save`` recorded with
      ``params`` (see ``verify_base``); without a recorded one, warn.
    fused_layout: for ``target_parameters`` on routed experts stored as one 3-D
      parameter (``ModuleMap.fused_experts``): ``"peft_swapped"`` (PEFT 0.21 on
      transformers 4.x) or ``"input_side"`` (transformers >= 5, vLLM). Default: the
      layout ``jlora.peft.save`` recorded, else read from the shapes (lora_A's width
      is the parameter's output or input size); an adapter whose shapes cannot tell
      (every targeted parameter square) needs it.

  Raises:
    PeftFormatError: an unsupported PEFT feature, a tensor that matches no base
      parameter, or a shape mismatch (each names the key).
    jlora.AdapterMismatchError: the adapter was exported from another base.
  """
  from safetensors.numpy import load_file

  config = read_config(directory)
  wpath = os.path.join(directory, WEIGHTS_NAME)
  if not os.path.exists(wpath):
    if os.path.exists(os.path.join(directory, "adapter_model.bin")):
      raise PeftFormatError(f"{directory!r} holds adapter_model.bin (pickle); re-save it with PEFT's "
                            "safe_serialization=True to get adapter_model.safetensors")
    raise FileNotFoundError(f"{directory!r} has no {WEIGHTS_NAME}")
  if check_base:
    verify_base(directory, params)
  tensors = load_file(wpath)
  mm = module_map or ModuleMap.for_model_type(model_type)

  candidates: dict[str, tuple[str, Any, tuple[int, ...]]] = {}
  fused: dict[str, tuple[str, Any, tuple[int, ...]]] = {}  # 3-D torch parameter -> (path, leaf, layer index)
  for path, leaf in leaves_with_paths(params, is_leaf=is_lora_weight):
    if is_lora_weight(leaf):
      raise PeftFormatError(f"{path!r} already holds an adapter; load onto plain base params")
    if mm.is_fused(path) and (layout or {}).get(path) is not None:
      batch = layout[path].normalized(len(leaf.shape)).batch_axes
      for idx in itertools.product(*(range(leaf.shape[a]) for a in batch[:-1])):
        fused[mm.to_module(path, idx)] = (path, leaf, idx)
      continue
    if len(getattr(leaf, "shape", ())) >= 2 and path.rsplit("/", 1)[-1] in ("kernel", "embedding"):
      # Stacked (scanned) kernels: one torch module per index of their batch axes.
      lay = (layout or {}).get(path)
      batch = lay.normalized(len(leaf.shape)).batch_axes if lay is not None else ()
      for idx in itertools.product(*(range(leaf.shape[a]) for a in batch)):
        try:
          candidates[mm.to_module(path, idx)] = (path, leaf, idx)
        except ValueError:
          break

  parts: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  for key, value in tensors.items():
    m = TENSOR_KEY.match(key)
    if not m:
      raise PeftFormatError(f"{wpath}: tensor {key!r} is not a LoRA A/B weight; jlora cannot load it")
    parts[m.group("module")][m.group("kind")] = value

  use_rslora = bool(config.get("use_rslora", False))
  built_fused = _fused(config, wpath, parts, fused, mm, layout or {}, fused_layout, use_rslora)
  # path -> (spec, A, B, module of the first slice) assembled from each module's slice
  built: dict[str, tuple[LoraSpec, np.ndarray, np.ndarray, np.ndarray | None, str]] = {}
  replacements: dict[str, LoraWeight] = {}
  # AdaLoRA: path -> (spec, A, B, E, rank mask, first module); uncovered layers keep zeros (the base)
  ada: dict[str, tuple] = {}
  for module, kinds in sorted(parts.items()):
    if module not in candidates:
      near = [c for c in candidates if c.endswith(module.split(".")[-1])][:3]
      raise PeftFormatError(f"{wpath}: module {module!r} matches no Flax parameter"
                            + (f" (similar: {near})" if near else "") + "; pass the right model_type or a ModuleMap")
    path, leaf, idx = candidates[module]
    embedding = "lora_embedding_A" in kinds
    a_t = kinds.get("lora_embedding_A" if embedding else "lora_A")
    b_t = kinds.get("lora_embedding_B" if embedding else "lora_B")
    if a_t is None or b_t is None:
      raise PeftFormatError(f"{wpath}: module {module!r} has only {sorted(kinds)}; both A and B are needed")
    r = a_t.shape[0]
    lay = (layout or {}).get(path) or mm.layout_for(path, len(leaf.shape), embedding)
    lay = lay.normalized(len(leaf.shape))
    if config["peft_type"] == "ADALORA":
      spec, a_s, b_s, e_s, m_s = _variants.adalora_slice(config, wpath, module, kinds, path, leaf, lay)
      if path not in ada:
        ada[path] = (spec, *(np.zeros(spec.factor_shapes[n], np.float32) for n in ("a", "b", "e", "rank_mask")),
                     module)
      if ada[path][0] != spec:
        raise PeftFormatError(f"{wpath}: {module!r} and {ada[path][-1]!r} are slices of the stacked parameter "
                              f"{path!r} but have different AdaLoRA ranks")
      for arr, val in zip(ada[path][1:5], (a_s, b_s, e_s, m_s)):
        arr[idx] = val
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
    nb = len(spec.batch_axes)
    if path not in built:
      mag = np.zeros(spec.factor_shapes["magnitude"], np.float32) if config.get("use_dora") else None
      built[path] = (spec, np.zeros(spec.a_shape, np.float32), np.zeros(spec.b_shape, np.float32), mag, module)
    first_spec, a, b, mag, first = built[path]
    if first_spec != spec:
      raise PeftFormatError(
          f"{wpath}: {module!r} and {first!r} are slices of the stacked parameter {path!r} but have different "
          f"ranks or alphas ({r}/{alpha} vs {first_spec.rank}/{first_spec.alpha}); a stacked kernel needs one "
          "rank and alpha for all its layers.")
    a[idx] = np.ascontiguousarray(a_t.T).reshape(spec.a_shape[nb:])
    b[idx] = np.ascontiguousarray(b_t.T).reshape(spec.b_shape[nb:])
    if mag is not None:
      mag[idx] = _variants.dora_magnitude(kinds, mag.shape[nb:], wpath, module)

  # Slices of a stacked kernel that the PEFT adapter does not cover (layers_to_transform)
  # keep A = B = 0: exactly the base there (for DoRA with the magnitude of the base, ‖W0‖).
  for path, (spec, a, b, e, mask, first) in ada.items():
    replacements[path] = LoraWeight(candidates[first][1], jax.numpy.asarray(a), jax.numpy.asarray(b), spec,
                                    {"e": jax.numpy.asarray(e), "rank_mask": jax.numpy.asarray(mask)})
  for path, (spec, a, b, w0) in built_fused.items():
    replacements[path] = LoraWeight(w0, jax.numpy.asarray(a), jax.numpy.asarray(b), spec)
  for path, (spec, a, b, mag, first) in built.items():
    w0 = candidates[first][1]
    extras = {}
    if mag is not None:
      covered = np.zeros(mag.shape[:len(spec.batch_axes)], bool)
      for module, (p, _, idx) in candidates.items():
        if p == path and module in parts:
          covered[idx] = True
      if not covered.all():
        zero_a = jax.numpy.zeros(spec.a_shape, jax.numpy.float32)
        base_norm = np.asarray(spec.variant.init_extras(spec, w0, {"a": zero_a, "b": jax.numpy.asarray(b)})
                               ["magnitude"], np.float32)
        mag = np.where(covered.reshape(covered.shape + (1,) * (mag.ndim - covered.ndim)), mag, base_norm)
      extras = {"magnitude": jax.numpy.asarray(mag)}
    replacements[path] = LoraWeight(w0, jax.numpy.asarray(a), jax.numpy.asarray(b), spec, extras)

  def replace(p, leaf):
    return replacements.get(path_str(p), leaf)

  return jax.tree_util.tree_map_with_path(replace, params)


def _fused(config: dict, wpath: str, parts: dict, fused: dict, mm: ModuleMap, layout: Mapping[str, Any],
           fused_layout: str | None, use_rslora: bool) -> dict:
  """The ``target_parameters`` tensors on 3-D expert parameters, removed from ``parts``: ``{path: (spec, a, b, w0)}``."""
  targets = list(config.get("target_parameters") or ())
  if not targets:
    return {}
  by_module: dict[str, list[str]] = collections.defaultdict(list)
  for name in fused:
    module, _, param = name.rpartition(".")
    if any(name == t or name.endswith("." + t) for t in targets):
      by_module[module].append(param)
  keys = {}  # PEFT module key -> parameter name
  for module, params_ in by_module.items():
    keys.update({key: f"{module}.{p}" for p, key in nesting(module, params_, mm.parameter_order).items()})
  stray = [m for m in parts if m not in keys and (m.endswith(".base_layer") or m.rpartition(".")[0] in by_module)]
  unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in fused)]
  if unknown or stray:
    raise PeftFormatError(
        f"{wpath}: target_parameters {unknown or stray} match no routed-expert kernel given as fused "
        "(ModuleMap.fused_experts, with its layout in layout=); pass the model's ModuleMap and layout.")
  recorded = _metadata(wpath).get(FUSED_LAYOUT_KEY)
  if fused_layout is not None and recorded is not None and fused_layout != recorded:
    raise PeftFormatError(f"{wpath}: saved with fused_layout={recorded!r}, loaded with {fused_layout!r}")
  name = fused_layout or recorded or _infer_fused_layout(wpath, parts, keys, fused, layout)
  name = check_fused_layout(name, f"jlora.peft.load({wpath!r})")
  out: dict = {}
  for key, param in keys.items():
    kinds = parts.pop(key, None)
    if kinds is None:
      continue
    path, leaf, idx = fused[param]
    lay = layout[path].normalized(len(leaf.shape))
    experts, din, dout = (leaf.shape[lay.batch_axes[-1]], leaf.shape[lay.in_axes[0]],
                          leaf.shape[lay.out_axes(len(leaf.shape))[0]])
    a_t, b_t = kinds.get("lora_A"), kinds.get("lora_B")
    if a_t is None or b_t is None or a_t.shape[0] % experts:
      raise PeftFormatError(f"{wpath}: {key!r} ({param}) needs lora_A and lora_B with experts x rank rows")
    r = a_t.shape[0] // experts
    want = fused_shapes(experts, r, din, dout, name)
    if (tuple(a_t.shape), tuple(b_t.shape)) != want:
      raise PeftFormatError(f"{wpath}: {param!r}: lora_A {a_t.shape} / lora_B {b_t.shape} do not fit a "
                            f"[{experts}, {din}, {dout}] parameter in the {name!r} layout (expected {want[0]} / "
                            f"{want[1]}); the other layout is "
                            f"{[l for l in ('peft_swapped', 'input_side') if l != name][0]!r}.")
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, param, config.get("lora_alpha", 8)))
    want_r = _pattern_value(config.get("rank_pattern") or {}, param, config.get("r", r))
    if int(want_r) != r:
      raise PeftFormatError(f"{wpath}: {param!r} has rank {r} but the config says {want_r}")
    spec = LoraSpec(shape=tuple(leaf.shape), layout=lay, rank=int(r), alpha=alpha, rslora=use_rslora,
                    variant=_variants.plain_variant())
    if path not in out:
      out[path] = (spec, np.zeros(spec.a_shape, np.float32), np.zeros(spec.b_shape, np.float32), leaf)
    if out[path][0] != spec:
      raise PeftFormatError(f"{wpath}: the layers of {path!r} have different ranks or alphas; a stacked kernel needs "
                            "one rank and alpha for all its layers.")
    a, b = fused_from_torch(a_t, b_t, experts, din, dout, name)
    out[path][1][idx] = a
    out[path][2][idx] = b
  return out


def _infer_fused_layout(wpath: str, parts: dict, keys: dict, fused: dict, layout: Mapping[str, Any]) -> str:
  """The layout the shapes tell: lora_A's width is the parameter's output size (swapped) or input size."""
  seen = set()
  for key, param in keys.items():
    a_t = parts.get(key, {}).get("lora_A")
    if a_t is None:
      continue
    path, leaf, _ = fused[param]
    lay = layout[path].normalized(len(leaf.shape))
    din, dout = leaf.shape[lay.in_axes[0]], leaf.shape[lay.out_axes(len(leaf.shape))[0]]
    if din != dout:
      seen.add("input_side" if a_t.shape[1] == din else "peft_swapped")
  if len(seen) == 1:
    return seen.pop()
  raise PeftFormatError(
      f"{wpath}: the shapes of its 3-D expert adapters cannot tell where lora_A sits (every targeted parameter is "
      "square, or they disagree) and no layout is recorded; pass fused_layout='peft_swapped' (PEFT 0.21 on "
      "transformers 4.x) or 'input_side' (transformers >= 5, vLLM).")


def _metadata(wpath: str) -> dict:
  from safetensors import safe_open

  with safe_open(wpath, "np") as f:
    return f.metadata() or {}
