"""Every jlora pytree node prints whatever its leaves are (arrays, None halves, tree.map results)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jlora
from jlora._apply.lowrank import LowRank, Source


def _lora_params():
  base = {"dense": {"kernel": jnp.ones((4, 6)), "bias": jnp.zeros((6,))}}
  return jlora.init(jax.random.key(0), base, jlora.LoraConfig(rank=2, alpha=4, targets=".*/kernel"))


def test_lora_weight_repr_of_arrays_and_of_anything_else():
  lp = _lora_params()
  want = "LoraWeight(w0=float32[4, 6], a=float32[4, 2], b=float32[2, 6], rank=2, scale=2)"
  assert repr(lp["dense"]["kernel"]) == want
  shapes = jax.tree.map(lambda a: a.shape, lp)
  assert repr(shapes["dense"]["kernel"]) == "LoraWeight(w0=(4, 6), a=(4, 2), b=(2, 6), rank=2, scale=2)"
  adapters, frozen = jlora.split(lp)
  assert repr(adapters["dense"]["kernel"]).startswith("LoraWeight(w0=None, a=float32[4, 2], b=float32[2, 6]")
  assert repr(frozen["dense"]["kernel"]).startswith("LoraWeight(w0=float32[4, 6], a=None, b=None")
  names = jax.tree.map(lambda a: f"<{a.ndim}-D>", adapters)
  assert "a='<2-D>', b='<2-D>'" in repr(names)
  abstract = jax.eval_shape(lambda p: p, lp)  # ShapeDtypeStruct children
  assert "w0=float32[4, 6]" in repr(abstract)
  sharded = jax.tree.map(lambda a: a.sharding, lp)  # objects with neither shape nor dtype
  assert "SingleDeviceSharding" in repr(sharded["dense"]["kernel"])

  @jax.jit
  def traced(p):  # tracers have a shape and a dtype
    assert repr(p["dense"]["kernel"]).startswith("LoraWeight(w0=float32[4, 6]")
    return p

  traced(lp)


def test_low_rank_value_repr():
  w = _lora_params()["dense"]["kernel"]
  value = LowRank.from_weight(w, w.w0, Source("dense/kernel", w.spec, 0))
  assert repr(value) == "LowRank(base=float32[4, 6], a=float32[4, 2], b=float32[2, 6], path='dense/kernel')"
  assert repr(jax.tree.map(lambda a: a.shape, value)).startswith("LowRank(base=(4, 6), a=(4, 2)")
