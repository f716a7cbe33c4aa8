"""A base model ready for LoRA (``LoadedModel``) and its tokenizer, whichever loader built it.

The lowest layer of the fine-tuning package's model handling: ``model.py`` (the
native decoder) and ``hf_flax.py`` (transformers 4.x Flax classes) both build a
``LoadedModel``; the commands use nothing else of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax

import jlora
import jlora.models
from jlora._targets import expand_targets
from jlora.peft import ModuleMap


class UnsupportedModelError(ValueError):
  """A model directory whose architecture neither the native decoder nor a transformers Flax class runs."""


class MissingWeightsError(ValueError):
  """A base checkpoint without some of the model's weights (never trained on silently)."""


# Prompts generated per compiled batch in exact-match evaluation (rows padded to a multiple of 8).
GENERATE_BATCH = 64


@dataclasses.dataclass
class LoadedModel:
  """A base model ready for LoRA: parameters, forward function, layouts, module names."""

  model: Any  # a jlora.models.Decoder (native) or a transformers Flax model (legacy)
  params: Any  # base parameters (the frozen W0 live here)
  tokenizer: Any
  model_id: str  # what the user passed, or the bundled default's name
  forward: Callable  # (params, ids, attention_mask, segment_ids=None) -> logits
  layout: dict[str, jlora.KernelLayout]  # kernel layouts for jlora.init
  module_map: ModuleMap  # parameter paths <-> PyTorch module names (PEFT)
  model_type: str
  max_positions: int | None = None  # the positions the model was trained for (config.json), if it says
  native: bool = True
  # Legacy only: generation and merged export through transformers' Flax classes.
  _generate: Callable | None = None
  _save: Callable | None = None

  def resolve_targets(self, targets: str) -> str:
    """``--targets`` -> regex: ``all-linear`` (not lm_head/embeddings, like PEFT), module names, or a regex.

    Raises:
      ValueError: ``all-linear`` on a model without linear kernels, or a module name it does not have.
    """
    return expand_targets(targets, self.layout, model=f"{self.model_id} ({self.model_type})")

  def generate(self, params: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               temperature: float = 0.0, seed: int = 0,
               adapter_ids: Sequence[int] | None = None) -> list[list[int]]:
    """Greedy (or sampled) continuations of token-id prompts, EOS excluded; adapters served unmerged.

    ``adapter_ids`` (native models only): with a bank (``jlora.stack``) as
    ``params``, each prompt's slot (``-1``: the base), all rows generated together.
    """
    tok = self.tokenizer
    if not self.native:
      if adapter_ids is not None:
        raise ValueError(f"adapter_ids: a {self.model_type} model runs on transformers' Flax classes, which "
                         "serve one adapter at a time; generate with each adapter's tree instead of a bank.")
      return self._generate(params, prompts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    if adapter_ids is not None and len(adapter_ids) != len(prompts):
      raise ValueError(f"adapter_ids: one adapter slot per prompt is needed, got {len(adapter_ids)} for "
                       f"{len(prompts)} prompts.")
    key = jax.random.key(seed)
    out: list[list[int]] = []
    for start in range(0, len(prompts), GENERATE_BATCH):
      chunk = [list(p) for p in prompts[start:start + GENERATE_BATCH]]
      n = len(chunk)
      filler = [[tok.pad_token_id]] * (-n % 8)  # a few compiled batch sizes only
      ids = {}
      if adapter_ids is not None:  # filler rows run the base alone
        ids = {"adapter_ids": [*map(int, adapter_ids[start:start + GENERATE_BATCH]), *[-1] * len(filler)]}
      key, sub = jax.random.split(key)
      res = jlora.models.generate(self.model, params, chunk + filler, max_new_tokens=max_new_tokens,
                                  temperature=temperature, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                  key=sub, **ids)
      out.extend(res[:n])
    return out

  def save_pretrained(self, directory: str, params: Any) -> str:
    """Writes ``params`` (plain, e.g. merged) as a Hugging Face model directory with the tokenizer."""
    if self.native:
      jlora.models.save(directory, self.model, params)
    else:
      self._save(directory, params)
    self.tokenizer.save_pretrained(directory)
    return directory


def _quiet_transformers():
  # transformers 5 announces at import that PyTorch is absent (jlora needs only its tokenizers).
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")
  try:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
  except Exception:  # pragma: no cover
    pass


def load_tokenizer(model_dir: str):
  """``AutoTokenizer`` of ``model_dir`` with a pad token (EOS when the tokenizer has none)."""
  _quiet_transformers()
  import transformers

  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer


def model_type_of(model_dir: str) -> str | None:
  path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--model {model_dir!r} has no config.json (a Hugging Face model directory is needed)")
  with open(path) as f:
    return json.load(f).get("model_type")
