"""Shared fixtures: one tiny Llama checkpoint (PyTorch, saved), its jlora twin, a random LoRA and its PEFT export."""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import pytest

import jlora
import jlora.models
import jlora.peft

sys.path.insert(0, os.path.dirname(__file__))

from objective_data import TARGETS, torch_llama  # noqa: E402


@dataclasses.dataclass
class Tiny:
  directory: str  # save_pretrained(safe_serialization=True) of the PyTorch model
  model: jlora.models.Decoder
  params: dict  # float32 base
  lora: dict  # LoRA tree: random non-zero A and B
  peft_dir: str  # jlora.peft.save of ``lora``


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
  from helpers import randomize

  pytest.importorskip("torch")
  d = str(tmp_path_factory.mktemp("llama"))
  torch_llama().save_pretrained(d, safe_serialization=True)
  model, params = jlora.models.load(d)
  cfg = jlora.LoraConfig(rank=4, alpha=8, targets=model.targets(",".join(TARGETS)))

  def make(params):
    lp = jlora.init(jax.random.key(0, impl="rbg"), params, cfg, layout=model.layout)
    return randomize(lp, jax.random.key(1, impl="rbg"), scale=0.3)

  lora = jax.jit(make)(params)
  peft_dir = jlora.peft.save(str(tmp_path_factory.mktemp("peft")), lora, module_map=model.module_map,
                             base_model_name_or_path=d)
  return Tiny(d, model, params, lora, peft_dir)


