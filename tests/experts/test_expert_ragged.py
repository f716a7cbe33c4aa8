"""Expert LoRA in the apply path: the ragged_dot consumer against a dense float64 oracle.

The MoE functions (``moe_fns``) are plain JAX: a sorted-dispatch MoE that calls
``jax.lax.ragged_dot`` (as MaxText and tunix do) and its dense-dispatch einsum twin,
stacked over layers under ``lax.scan``. The oracle merges every kernel densely
(``W0 + s·A⊗B``) in float64 and runs the dense twin: values and the gradients of every
expert ``A``/``B`` must agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora._apply.consumers import ragged
from helpers import assert_close, oracle_params
from moe_fns import adapters as make_adapters
from moe_fns import decoder, init_params, inputs, layout, oracle_decoder

EXPERTS = r"layers/mlp/experts/.*/kernel"
# x: (B, S, H) = (2, 3, 16); 4 experts of width 8, top-2, 2 layers.
X_SHAPE = (2, 3, 16)


def _merged(lp):
  """Every adapted kernel merged densely, ``W0 + s·A⊗B``, in the adapters' dtype (differentiable)."""
  def merge(w):
    if not isinstance(w, jlora.LoraWeight):
      return w
    expert = w.a.ndim == 4  # [L, E, in, r] / [L, E, r, out]
    d = jnp.einsum("leir,lero->leio" if expert else "lir,lro->lio", w.a, w.b, precision="highest")
    return w.w0 + w.spec.scale * d

  return jax.tree.map(merge, lp, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))


def _setup(cfg, *, dtype=jnp.float32, shared=False, key=0):
  p = init_params(key, dtype=dtype, shared=shared)
  x = inputs(key + 1, X_SHAPE, dtype)
  lp = make_adapters(key + 2, p, cfg)
  return p, x, lp


@pytest.mark.parametrize("dispatch,lowering", [("sorted", None), ("sorted", "ragged"), ("sorted", False),
                                               ("dense", None)],
                         ids=["sorted-custom_vjp", "sorted-custom_vjp_ragged_dot", "sorted-autodiff", "dense-custom_vjp"])
def test_values_and_expert_gradients_match_dense_float64_oracle(dispatch, lowering, monkeypatch):
  """rsLoRA and per-rule ranks and alphas on the experts, plain LoRA on q_proj."""
  if lowering == "ragged":  # the custom VJP as on TPU/GPU: ragged_dot, not the CPU's masked products
    monkeypatch.setattr(ragged, "MASKED_BACKENDS", ())
    lowering = None
  with jax.enable_x64(True):
    cfg = jlora.LoraConfig(rank=3, alpha=5, rslora=True, adapter_dtype="float64", targets=[
        jlora.Rule(pattern=r"layers/mlp/experts/gate_proj/kernel", rank=2, alpha=3),
        jlora.Rule(pattern=r"layers/mlp/experts/down_proj/kernel", rank=5, alpha=8),
        r"layers/mlp/experts/up_proj/kernel", r"layers/self_attn/q_proj/kernel"])
    p, x, lp = _setup(cfg, dtype=jnp.float64)
    experts = lp["layers"]["mlp"]["experts"]
    assert [experts[n]["kernel"].spec.rank for n in ("gate_proj", "up_proj", "down_proj")] == [2, 3, 5]
    assert experts["gate_proj"]["kernel"].a.shape == (2, 4, 16, 2)
    assert experts["gate_proj"]["kernel"].spec.scale == pytest.approx(3 / np.sqrt(2))
    f = lambda params, x: decoder(params, x, dispatch=dispatch)
    wrapped = jax.jit(jlora.wrap(f, fused_expansion=lowering))
    want = oracle_decoder(oracle_params(lp), x)  # NumPy, per-expert loop
    assert_close(wrapped(lp, x), want, rtol=1e-11, atol=1e-11)
    # B = 0 is the base, bit for bit (the same compiled program).
    zero_b = jax.tree.map(lambda w: w.replace(b=jnp.zeros_like(w.b)) if isinstance(w, jlora.LoraWeight) else w, lp,
                          is_leaf=lambda w: isinstance(w, jlora.LoraWeight))
    np.testing.assert_array_equal(np.asarray(wrapped(zero_b, x)), np.asarray(jax.jit(f)(p, x)))
    adapters, frozen = jlora.split(lp)
    loss = lambda a: jnp.sum(jnp.sin(wrapped(jlora.combine(a, frozen), x)))
    dense_loss = lambda a: jnp.sum(jnp.sin(decoder(_merged(jlora.combine(a, frozen)), x, dispatch="dense")))
    g, g_ref = jax.grad(loss)(adapters), jax.grad(dense_loss)(adapters)
    for name in ("gate_proj", "up_proj", "down_proj"):
      got, ref = g["layers"]["mlp"]["experts"][name]["kernel"], g_ref["layers"]["mlp"]["experts"][name]["kernel"]
      assert np.abs(np.asarray(ref.a)).max() > 1e-3 and np.abs(np.asarray(ref.b)).max() > 1e-3
      assert_close(got.a, ref.a, rtol=1e-10, atol=1e-10)
      assert_close(got.b, ref.b, rtol=1e-10, atol=1e-10)


def _shapes_produced(jaxpr) -> set:
  out = set()
  for eqn in jaxpr.eqns:
    out |= {tuple(v.aval.shape) for v in eqn.outvars}
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out |= _shapes_produced(sub)
  return out


@pytest.mark.parametrize("lowering", [None, False], ids=["custom_vjp", "autodiff"])
def test_no_per_expert_delta_forward_or_backward(lowering):
  """No value of an expert kernel's shape ([E, in, out], or stacked) is built from the factors."""
  p = init_params(0, hidden=12, inter=10, experts=5)
  x = inputs(1, (2, 3, 12))
  lp = make_adapters(2, p, jlora.LoraConfig(rank=2, targets=EXPERTS))
  adapters, frozen = jlora.split(lp)
  wrapped = jlora.wrap(decoder, fused_expansion=lowering)
  loss = lambda a: jnp.sum(wrapped(jlora.combine(a, frozen), x) ** 2)
  kernel_shapes = {(5, 12, 10), (5, 10, 12), (2, 5, 12, 10), (2, 5, 10, 12)}
  fwd = _shapes_produced(jax.make_jaxpr(wrapped)(lp, x).jaxpr)
  bwd = _shapes_produced(jax.make_jaxpr(jax.grad(loss))(adapters).jaxpr)
  assert not kernel_shapes & (fwd | bwd), kernel_shapes & (fwd | bwd)
  # The check can fail: full fine-tuning's expert gradient has the kernel's shape.
  full = _shapes_produced(jax.make_jaxpr(jax.grad(lambda q: jnp.sum(decoder(q, x) ** 2)))(p).jaxpr)
  assert kernel_shapes & full


def test_custom_vjp_rebuilds_the_sorted_input_instead_of_saving_it():
  """The sorted rows x[order // k] are top_k times the tokens: the term keeps the roots they are
  gathered from (and the down projection's silu(g)·u is rebuilt from g and u)."""
  p = init_params(0, hidden=12, inter=10, experts=5)
  x = inputs(1, (2, 3, 12))
  lp = make_adapters(2, p, jlora.LoraConfig(rank=2, targets=EXPERTS))
  adapters, frozen = jlora.split(lp)

  def residual_bytes(lowering):
    wrapped = jlora.wrap(decoder, fused_expansion=lowering)
    _, vjp = jax.vjp(lambda a: wrapped(jlora.combine(a, frozen), x), adapters)
    return sum(r.size * r.dtype.itemsize for r in jax.tree.leaves(vjp) if jnp.issubdtype(r.dtype, jnp.floating))

  assert residual_bytes(None) < residual_bytes(False)


def test_dropout_masks_are_redrawn_in_the_backward_pass():
  """With a dropout key both lowerings draw the same masks: the custom VJP (which saves none and
  redraws them) gives plain autodiff's values and gradients; without a key there is no dropout."""
  cfg = jlora.LoraConfig(rank=3, alpha=5, dropout=0.25, targets=EXPERTS)
  p, x, lp = _setup(cfg)
  key = jax.random.key(7)
  adapters, frozen = jlora.split(lp)
  outs, grads = [], []
  for lowering in (None, False):
    wrapped = jlora.wrap(decoder, fused_expansion=lowering)

    def loss(a):
      y = wrapped(jlora.combine(a, frozen), x, lora_rng=key)
      return jnp.mean(jnp.square(y)), y

    g, y = jax.jit(jax.grad(loss, has_aux=True))(adapters)
    outs.append(y)
    grads.append(g)
  assert_close(outs[0], outs[1], rtol=2e-5, atol=2e-5)
  assert not np.allclose(np.asarray(outs[0]), oracle_decoder(oracle_params(lp), x), atol=1e-3)
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_nf4_expert_kernels_decode_inside_the_consumer():
  p = init_params(0, hidden=64, inter=64)
  x = inputs(1, (2, 3, 64))
  q = jlora.quantize(p, targets=EXPERTS, layout=layout(p))
  assert isinstance(q["layers"]["mlp"]["experts"]["down_proj"]["kernel"], jlora.NF4Weight)
  lp = make_adapters(2, q, jlora.LoraConfig(rank=4, targets=EXPERTS))
  deq = jlora.dequantize(q)
  dense = jax.tree.map(lambda w, d: w.replace(w0=d) if isinstance(w, jlora.LoraWeight) else w, lp, deq,
                       is_leaf=lambda w: isinstance(w, jlora.LoraWeight))
  want = oracle_decoder(oracle_params(dense), x)
  assert_close(jax.jit(jlora.wrap(decoder))(lp, x), want, rtol=2e-4, atol=2e-4)
  # The backward pass keeps the 4-bit codes, never a float kernel of an expert's shape.
  adapters, frozen = jlora.split(lp)
  _, vjp = jax.vjp(lambda a: jlora.wrap(decoder)(jlora.combine(a, frozen), x), adapters)
  floats = [r.shape for r in jax.tree.leaves(vjp) if jnp.issubdtype(r.dtype, jnp.floating)]
  assert not any(s[-3:] == (4, 64, 64) for s in floats), floats


def test_merge_in_float32_of_bfloat16_experts():
  cfg = jlora.LoraConfig(rank=4, alpha=8, targets=EXPERTS)
  p, x, lp = _setup(cfg, dtype=jnp.bfloat16)
  merged = jlora.merge(lp)
  w = lp["layers"]["mlp"]["experts"]["up_proj"]["kernel"]
  want = (np.asarray(w.w0, np.float32) + w.spec.scale * np.einsum("leir,lero->leio", np.asarray(w.a, np.float64),
                                                                   np.asarray(w.b, np.float64))).astype(jnp.bfloat16)
  got = merged["layers"]["mlp"]["experts"]["up_proj"]["kernel"]
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0, atol=0.02)
  assert np.mean(np.asarray(got, np.float32) == np.asarray(want, np.float32)) > 0.99


@pytest.mark.parametrize("dispatch", ["sorted"])  # (dense dispatch: DoRA's dot_general rule, tested in tests/variants)
def test_dora_on_experts_matches_its_oracle(dispatch):
  from variants import oracles

  cfg = jlora.LoraConfig(rank=3, alpha=6, targets=EXPERTS, dora=True)
  p, x, lp = _setup(cfg)
  lp = oracles.randomize_children(lp, jax.random.key(5), ["magnitude"])
  assert lp["layers"]["mlp"]["experts"]["gate_proj"]["kernel"].factors["magnitude"].shape == (2, 4, 8)
  want = oracle_decoder(oracles.dense_params(lp, oracles.dora_kernel), x)
  got = jax.jit(jlora.wrap(lambda q, x: decoder(q, x, dispatch=dispatch)))(lp, x)
  assert_close(got, want, rtol=1e-4, atol=1e-4)
  assert_close(jlora.merge(lp)["layers"]["mlp"]["experts"]["gate_proj"]["kernel"],
               oracles.dora_kernel(lp["layers"]["mlp"]["experts"]["gate_proj"]["kernel"]), rtol=1e-5, atol=1e-5)


def test_infer_layout_finds_the_expert_axis_of_ragged_dot():
  p = init_params(0)
  assert jlora.infer_layout(decoder, p, jnp.ones(X_SHAPE)) == layout(p)
  # Dense dispatch reads gate/up as th,ehi->eti: there the expert axis is an output axis of the use
  # (an adapter with A shared by the experts fits it too), so such a model names its layout.
  dense = jlora.infer_layout(lambda q, x: decoder(q, x, dispatch="dense"), p, jnp.ones(X_SHAPE))
  assert dense["layers/mlp/experts/gate_proj/kernel"].batch_axes == (0,)
  assert dense["layers/mlp/experts/down_proj/kernel"] == layout(p)["layers/mlp/experts/down_proj/kernel"]


def test_an_expert_axis_that_is_not_stacked_is_an_error():
  p = init_params(0)
  x = jnp.ones(X_SHAPE)
  lay = {k: (jlora.KernelLayout(batch_axes=(0,), in_axes=(2,)) if "/experts/" in k else v)
         for k, v in layout(p).items()}
  lp = jlora.init(jax.random.key(1), p, jlora.LoraConfig(rank=2, targets=EXPERTS), layout=lay)
  with pytest.raises(jlora.LoraApplyError, match=r"experts/gate_proj/kernel.*ragged_dot.*stacked axis of its adapter"
                     r".*batch_axes=\(0, 1\)"):
    jlora.wrap(decoder)(lp, x)


def test_ragged_dot_uses_without_a_low_rank_form_are_errors():
  lp = jlora.init(jax.random.key(0), {"w": jnp.ones((6, 5))}, jlora.LoraConfig(rank=2, targets="w"))
  sizes = jnp.array([2, 0, 3, 1], jnp.int32)
  # the ragged-contraction mode (the form of a weight gradient): one output per group
  dn = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((1,), (0,)), ((), ())), lhs_ragged_dimensions=(1,),
                                         rhs_group_dimensions=())
  contract = lambda p, x: jax.lax.ragged_dot_general(x, p["w"], sizes, dn)
  with pytest.raises(jlora.LoraApplyError, match=r"'w' reaches `ragged_dot_general`.*contracts or batches over its "
                                                 r"ragged dimension"):
    jax.eval_shape(jlora.wrap(contract), lp, jnp.ones((3, 6)))
  as_rows = lambda p, x: jax.lax.ragged_dot(p["w"], x, sizes)
  with pytest.raises(jlora.LoraApplyError, match=r"LoRA kernel as the grouped input of a ragged_dot"):
    jax.eval_shape(jlora.wrap(as_rows), lp, jnp.ones((4, 5, 2)))
