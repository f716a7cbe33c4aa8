"""Shared fixtures: one tiny random PyTorch checkpoint per family, saved and loaded once per session."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import families  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jlora  # noqa: E402
import jlora.models  # noqa: E402

from families import IDS  # noqa: E402,F401  (the tests import it from families)


@dataclasses.dataclass
class Family:
  name: str
  torch_model: object  # transformers PyTorch model, float32, eval mode
  directory: str  # its save_pretrained(safe_serialization=True) directory
  model: jlora.models.Decoder
  params: dict  # float32

  def __post_init__(self):
    self.forward = jax.jit(self.model.__call__)  # one compiled forward per family, shared by the tests
    if self.model.config.is_moe:  # (logits, router logits (L_moe, B, T, E))
      self.routed = jax.jit(functools.partial(self.model.__call__, return_router_logits=True))

  def torch_logits(self, ids=IDS, **kwargs) -> np.ndarray:
    with torch.no_grad():
      return self.torch_model(torch.as_tensor(np.asarray(ids)), **kwargs).logits.float().numpy()


@pytest.fixture(scope="session")
def family(tmp_path_factory):
  """``family(name)`` -> ``Family``, built once per test session (per xdist worker)."""
  cache: dict[str, Family] = {}

  def get(name: str) -> Family:
    if name not in cache:
      tm = families.torch_model(name)
      d = families.save_torch(tm, tmp_path_factory.mktemp(name))
      model, params = jlora.models.load(d)
      cache[name] = Family(name, tm, d, model, params)
    return cache[name]

  return get
