"""The two extension points of the apply path: variants (extra adapter children with their own
consumer rule) and lazy kernels (bases stored in another form, decoded at their use).

Both are exercised with small test-only implementations against dense float64 oracles, on
the layer kinds whose structural ops move the extra children: plain, DenseGeneral (reshape of
output axes), transposed storage and scanned stacked layers.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jlora
import jlora.sharding
from jlora._apply.consumers.plain import lora_dot_term
from jlora._apply.context import ConsumerContext
from jlora._apply.lowrank import Letters
from jlora._lazy import Deferred
from helpers import assert_close, oracle_kernel, randomize

KEY = jax.random.key(0)
F32 = dict(rtol=2e-5, atol=2e-5)  # f32 vs a float64 oracle on O(10)-sized sums


# -- a test variant: the low-rank term gated per output feature ---------------------------------


@dataclasses.dataclass(frozen=True)
class Gated(jlora.Variant):
  """W = W0 + scale·(A⊗B)⊙g with a trained gate g over the output (and stacked) axes."""

  name = "test-gated"

  def factor_axes(self, spec):
    return {**super().factor_axes(spec), "gate": (*spec.batch_axes, *spec.out_axes)}

  def dot(self, ctx, v, x, base_out, plan):
    assert isinstance(ctx, ConsumerContext)  # what a consumer rule may ask of the interpreter
    term = lora_dot_term(ctx, v, x, plan, scale=v.source.spec.scale)
    L = Letters()
    gate = v.factors["gate"].astype(term.dtype)
    spec = f"{L(plan.out_labels)},{L(v.flabels['gate'])}->{L(plan.out_labels)}"
    return base_out + jnp.einsum(spec, term, gate)

  def delta(self, w, dtype):
    d = super().delta(w, dtype)
    spec = w.spec
    g = jnp.asarray(w.factors["gate"], dtype)
    # broadcast the gate (batch..., out...) onto the kernel layout
    shape = [spec.shape[i] if i in spec.batch_axes + spec.out_axes else 1 for i in range(len(spec.shape))]
    order = list(spec.batch_axes) + list(spec.out_axes)
    g = jnp.transpose(g, np.argsort(np.argsort(order))) if len(order) > 1 else g
    return d * g.reshape(shape)


def gated_init(key, params, cfg, layout=None):
  lp = jlora.init(key, params, cfg, layout=layout)
  keys = iter(jax.random.split(jax.random.key(7), 64))

  def convert(x):
    if not isinstance(x, jlora.LoraWeight):
      return x
    spec = dataclasses.replace(x.spec, variant=Gated())
    gate = 0.5 + jax.random.uniform(next(keys), spec.factor_shapes["gate"])
    return jlora.LoraWeight(x.w0, x.a, x.b, spec, {"gate": gate})

  return jax.tree.map(convert, lp, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))


def gated_oracle(lp):
  def dense(x):
    if not isinstance(x, jlora.LoraWeight):
      return x
    plain = jlora.LoraWeight(np.zeros(x.spec.shape), x.a, x.b, dataclasses.replace(x.spec, variant=jlora.Variant()))
    d = oracle_kernel(plain)  # scale·(A⊗B) in float64
    spec = x.spec
    gate = np.asarray(x.factors["gate"], np.float64)
    order = list(spec.batch_axes) + list(spec.out_axes)
    shape = [spec.shape[i] if i in order else 1 for i in range(len(spec.shape))]
    gate = np.transpose(gate, np.argsort(np.argsort(order))).reshape(shape) if len(order) > 1 else gate.reshape(shape)
    return jnp.asarray(np.asarray(x.w0, np.float64) + d * gate, x.w0.dtype)

  return jax.tree.map(dense, lp, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))


def linen(module, x):
  params = module.init(KEY, x)["params"]
  return (lambda p, x: module.apply({"params": p}, x)), params


CASES = {
    "dense": (nn.Dense(6), (3, 8), None),
    "dense_general": (nn.DenseGeneral((2, 3)), (3, 8), None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gated_variant_matches_dense_oracle(name):
  module, shape, _ = CASES[name]
  f, p = linen(module, jnp.ones(shape))
  x = jax.random.normal(KEY, shape)
  layout = jlora.infer_layout(f, p, x)
  lp = randomize(gated_init(jax.random.key(1), p, jlora.LoraConfig(rank=2, alpha=4, targets="kernel"), layout),
                 jax.random.key(2))
  for fused in (False, True):
    got = jax.jit(jlora.wrap(f, fused_expansion=fused))(lp, x)
    assert_close(got, f(gated_oracle(lp), x), **F32)
  # merge goes through the variant's delta
  assert_close(f(jlora.merge(lp), x), f(gated_oracle(lp), x), **F32)


def _stacked():
  """Three stacked (in, out) kernels used under lax.scan, as a scanned decoder does."""
  params = {"layers": {"w": jax.random.normal(KEY, (3, 8, 8)) / 3}}

  def f(p, x):
    def body(h, w):
      return jnp.tanh(h @ w), None

    return jax.lax.scan(body, x, p["layers"]["w"])[0]

  layout = {"layers/w": jlora.KernelLayout(in_axes=(1,), batch_axes=(0,))}
  return f, params, layout


def test_gated_variant_under_scan_and_grad_matches_oracle():
  f, p, layout = _stacked()
  x = jax.random.normal(KEY, (4, 8))
  lp = randomize(gated_init(jax.random.key(1), p, jlora.LoraConfig(rank=2, targets="layers/w"), layout),
                 jax.random.key(3))
  assert lp["layers"]["w"].factors["gate"].shape == (3, 8)
  assert_close(jax.jit(jlora.wrap(f))(lp, x), f(gated_oracle(lp), x), **F32)

  adapters, frozen = jlora.split(lp)
  assert adapters["layers"]["w"].factors["gate"] is not None and frozen["layers"]["w"].factors["gate"] is None
  loss = lambda a: jnp.sum(jlora.wrap(f)(jlora.combine(a, frozen), x) ** 2)
  g = jax.jit(jax.grad(loss))(adapters)

  w = lp["layers"]["w"]

  def oracle_loss(gate):  # the dense gated kernel of a stacked (layers, in, out) weight
    dense = w.w0 + w.spec.scale * jnp.einsum("lir,lro->lio", w.a, w.b) * gate[:, None, :]
    return jnp.sum(f({"layers": {"w": dense}}, x) ** 2)

  # float32 vs float32 autodiff of the dense form: same math, different summation order.
  assert_close(g["layers"]["w"].factors["gate"], jax.grad(oracle_loss)(lp["layers"]["w"].factors["gate"]),
               rtol=1e-4, atol=1e-5)


def test_variant_tree_plumbing_round_trips():
  f, p, layout = _stacked()
  lp = randomize(gated_init(jax.random.key(1), p, jlora.LoraConfig(rank=2, targets="layers/w"), layout),
                 jax.random.key(3))
  w = lp["layers"]["w"]
  assert "variant=test-gated" in repr(w)
  assert jax.tree.leaves(jlora.labels(lp)) == ["frozen", "lora", "lora", "lora"]
  c = jlora.count(lp)
  assert c.trainable == 3 * 8 * 2 * 2 + 3 * 8
  back = jlora.combine(*jlora.split(lp))
  assert all(x is y for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(lp)))
  d = jlora.save_adapter(os.path.join(tempfile.mkdtemp(), "a"), lp)
  meta = jlora.read_adapter_metadata(d)
  assert meta["adapters"]["layers/w"]["variant"] == {"name": "test-gated"}
  loaded = jlora.load_adapter(d, p)["layers"]["w"]
  assert loaded.spec == w.spec
  for name in w.factors:
    np.testing.assert_array_equal(np.asarray(loaded.factors[name]), np.asarray(w.factors[name]))
  specs = jlora.sharding.child_specs(w.spec, P("fsdp", None, "tensor"))
  assert specs == {"a": P("fsdp", None, None), "b": P("fsdp", None, "tensor"), "gate": P("fsdp", "tensor")}
  with pytest.raises(ValueError, match="children"):
    jlora.LoraWeight(w.w0, w.a, w.b, w.spec)


def test_repr_of_non_array_children():
  f, p, layout = _stacked()
  lp = gated_init(jax.random.key(1), p, jlora.LoraConfig(rank=2, targets="layers/w"), layout)
  shapes = jax.tree.map(lambda a: a.shape, lp)
  assert "w0=(3, 8, 8)" in repr(shapes["layers"]["w"])


# -- a test lazy kernel: int8 codes with one float32 scale per layer ---------------------------------


def _decode_int8(storage, shape):
  q, scale = storage
  return (q.astype(jnp.float32) * scale[..., None, None]).reshape(shape)


@jax.tree_util.register_pytree_node_class
class Int8Weight:
  def __init__(self, q, scale):
    self.q, self.scale = q, scale

  def tree_flatten(self):
    return (self.q, self.scale), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children)

  def __jlora_lazy__(self):
    return Deferred((self.q, self.scale), _decode_int8, self.q.shape, jnp.float32)


def quantize_int8(w):
  scale = jnp.max(jnp.abs(w), axis=(-2, -1)) / 127.0
  q = jnp.round(w / scale[..., None, None]).astype(jnp.int8)
  return Int8Weight(q, scale)


def test_lazy_kernel_under_scan_matches_oracle_and_saves_no_dense_kernel():
  f, p, layout = _stacked()
  qp = {"layers": {"w": quantize_int8(p["layers"]["w"])}}
  dense = {"layers": {"w": _decode_int8((qp["layers"]["w"].q, qp["layers"]["w"].scale), (3, 8, 8))}}
  x = jax.random.normal(KEY, (4, 8))
  # a frozen lazy kernel without adapter
  assert_close(jax.jit(jlora.wrap(f))(qp, x), f(dense, x), **F32)
  # with an adapter on it
  lp = randomize(jlora.init(jax.random.key(1), qp, jlora.LoraConfig(rank=2, targets="layers/w"), layout=layout),
                 jax.random.key(2))
  assert isinstance(lp["layers"]["w"].w0, Int8Weight)
  want = lp["layers"]["w"].replace(w0=dense["layers"]["w"])
  assert_close(jax.jit(jlora.wrap(f))(lp, x), f({"layers": {"w": oracle_kernel(want)}}, x), **F32)
  assert_close(jlora.merge(lp)["layers"]["w"], oracle_kernel(want), **F32)
  # backward: the residuals hold the int8 codes, never a float kernel of a layer's shape
  adapters, frozen = jlora.split(lp)
  loss = lambda a: jnp.sum(jlora.wrap(f)(jlora.combine(a, frozen), x) ** 2)
  _, vjp = jax.vjp(loss, adapters)
  floats = [r for r in jax.tree.leaves(vjp) if jnp.issubdtype(r.dtype, jnp.floating)]
  assert not any(r.shape[-2:] == (8, 8) for r in floats), [r.shape for r in floats]
  g = jax.grad(loss)(adapters)["layers"]["w"]
  dense_adapters, dense_frozen = jlora.split({"layers": {"w": want}})
  dense_loss = lambda a: jnp.sum(jlora.wrap(f)(jlora.combine(a, dense_frozen), x) ** 2)
  g_dense = jax.grad(dense_loss)(dense_adapters)["layers"]["w"]
  assert_close(g.a, g_dense.a, rtol=1e-5, atol=1e-6)
  assert_close(g.b, g_dense.b, rtol=1e-5, atol=1e-6)


def test_lazy_kernel_records_structural_ops():
  w = jax.random.normal(KEY, (8, 6))
  q = quantize_int8(w[None])
  qw = Int8Weight(q.q[0], q.scale[0])
  dense = _decode_int8((qw.q, qw.scale), (8, 6))
  f = lambda p, x: x @ p["w"].T.astype(jnp.bfloat16).astype(jnp.float32).T * 2.0
  x = jax.random.normal(KEY, (3, 8))
  assert_close(jax.jit(jlora.wrap(f))({"w": qw}, x), f({"w": dense}, x), **F32)
  # a use the low-rank path cannot serve decodes a frozen lazy kernel in place
  g = lambda p, x: x @ (p["w"] + 1.0)
  assert_close(jlora.wrap(g)({"w": qw}, x), g({"w": dense}, x), **F32)
  assert jlora.count({"w": qw}).frozen_bytes == 8 * 6 + 4


# -- registered init methods and a variant's own initial children -------------------------------------


@dataclasses.dataclass(frozen=True)
class GatedOnes(Gated):
  name = "test-gated-ones"

  def init_extras(self, spec, w0, factors):
    return {"gate": jnp.ones(spec.factor_shapes["gate"])}


def _halve_base_init(key, spec, w0, config):
  """A test init method that changes the base (as PiSSA does): w0/2, and A = B = 1."""
  return w0 / 2, {"a": jnp.ones(spec.a_shape), "b": jnp.ones(spec.b_shape)}


def test_registered_init_method_and_variant_config():
  from jlora._init_methods import register_init

  register_init(r"test-halve(_\d+)?", _halve_base_init, shown="test-halve[_N]")
  cfg = jlora.LoraConfig(rank=2, targets="w", init="test-halve_3", variant=GatedOnes())
  assert jlora.LoraConfig.from_dict(cfg.to_dict()) == cfg
  w = jnp.arange(12.0).reshape(3, 4)
  lp = jlora.init(KEY, {"w": w}, cfg)["w"]
  np.testing.assert_array_equal(np.asarray(lp.w0), np.asarray(w) / 2)
  np.testing.assert_array_equal(np.asarray(lp.factors["gate"]), np.ones(4))
  assert lp.spec.variant == GatedOnes()
  with pytest.raises(ValueError, match="LoraConfig.init must be one of .*test-halve"):
    jlora.LoraConfig(targets="w", init="nope")
  with pytest.raises(ValueError, match="LoraConfig.variant must be a jlora.Variant"):
    jlora.LoraConfig(targets="w", variant="dora")
