"""The low-rank apply path against a dense oracle, on every supported layer kind."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from helpers import assert_close, oracle_params, randomize

KEY = jax.random.key(0)
# float32 on CPU: the oracle is float64; LoRA and oracle differ only by f32 rounding of
# O(10-100)-sized sums, so 2e-5 relative with a small absolute floor is tight.
F32 = dict(rtol=2e-5, atol=2e-5)


def _check(f, params, cfg, *args, layout_fn=None, **kwargs):
  """B = 0 is exact; random A, B match the dense oracle under jit."""
  layout = None
  if layout_fn is not None:
    layout = jlora.infer_layout(layout_fn, params, *args, **kwargs)
  lp0 = jlora.init(jax.random.key(1), params, cfg, layout=layout)
  lp = randomize(lp0, jax.random.key(2))
  base = jax.jit(f)(params, *args, **kwargs)
  want = jax.jit(f)(oracle_params(lp), *args, **kwargs)
  # Both lowerings of the rank expansion: plain matmuls, and fused multiply-adds.
  for fused in (False, True):
    wrapped = jax.jit(jlora.wrap(f, fused_expansion=fused))
    np.testing.assert_array_equal(np.asarray(wrapped(lp0, *args, **kwargs)), np.asarray(base))
    got = wrapped(lp, *args, **kwargs)
    assert not np.allclose(np.asarray(got), np.asarray(base), atol=1e-3), "adapter had no effect"
    assert_close(got, want, **F32)
  return lp


def linen(module, x, *extra):
  params = module.init(KEY, x, *extra)["params"]
  return (lambda p, x, *e: module.apply({"params": p}, x, *e)), params


def test_dense():
  f, p = linen(nn.Dense(6), jnp.ones((3, 8)))
  _check(f, p, jlora.LoraConfig(rank=2, alpha=4, targets="kernel"), jax.random.normal(KEY, (3, 8)))


def test_dense_batched_input_and_vmap():
  f, p = linen(nn.Dense(6), jnp.ones((2, 5, 8)))
  x = jax.random.normal(KEY, (4, 2, 5, 8))
  lp = randomize(jlora.init(KEY, p, jlora.LoraConfig(rank=3, targets="kernel")), KEY)
  got = jax.jit(jax.vmap(jlora.wrap(f), in_axes=(None, 0)))(lp, x)
  assert_close(got, jax.vmap(f, in_axes=(None, 0))(oracle_params(lp), x), **F32)


def test_kernel_stored_transposed():
  params = {"w": jax.random.normal(KEY, (6, 8))}  # (out, in)
  f = lambda p, x: x @ p["w"].T
  x = jax.random.normal(KEY, (3, 8))
  lp = _check(f, params, jlora.LoraConfig(rank=2, targets="w"), x, layout_fn=f)
  assert lp["w"].a.shape == (8, 2) and lp["w"].b.shape == (2, 6)


def test_gpt2_conv1d_transposed_inside_layer():
  from transformers.models.gpt2.modeling_flax_gpt2 import FlaxConv1D

  f, p = linen(FlaxConv1D(features=12), jnp.ones((2, 4, 8)))
  assert p["kernel"].shape == (12, 8)
  x = jax.random.normal(KEY, (2, 4, 8))
  lp = _check(f, p, jlora.LoraConfig(rank=2, targets="kernel"), x, layout_fn=f)
  assert lp["kernel"].spec.in_axes == (1,)


def test_transposed_use_without_layout_is_an_error():
  from transformers.models.gpt2.modeling_flax_gpt2 import FlaxConv1D

  f, p = linen(FlaxConv1D(features=12), jnp.ones((2, 8)))
  lp = jlora.init(KEY, p, jlora.LoraConfig(rank=2, targets="kernel"))
  with pytest.raises(jlora.LoraApplyError, match=r"'kernel' is contracted over kernel axes \(1,\).*infer_layout"):
    jlora.wrap(f)(lp, jnp.ones((2, 8)))


def test_dense_general_qkv_projection():
  m = nn.DenseGeneral(features=(4, 5), axis=-1)  # kernel (d, heads, head_dim)
  f, p = linen(m, jnp.ones((2, 3, 8)))
  assert p["kernel"].shape == (8, 4, 5)
  x = jax.random.normal(KEY, (2, 3, 8))
  lp = _check(f, p, jlora.LoraConfig(rank=3, targets="kernel"), x, layout_fn=f)
  assert lp["kernel"].a.shape == (8, 3) and lp["kernel"].b.shape == (3, 4, 5)


def test_dense_general_output_projection():
  m = nn.DenseGeneral(features=8, axis=(-2, -1))  # kernel (heads, head_dim, d)
  f, p = linen(m, jnp.ones((2, 3, 4, 5)))
  x = jax.random.normal(KEY, (2, 3, 4, 5))
  lp = _check(f, p, jlora.LoraConfig(rank=3, targets="kernel"), x, layout_fn=f)
  assert lp["kernel"].a.shape == (4, 5, 3) and lp["kernel"].b.shape == (3, 8)


def test_explicit_layout_rule_matches_inferred():
  m = nn.DenseGeneral(features=8, axis=(-2, -1))
  f, p = linen(m, jnp.ones((2, 3, 4, 5)))
  rule = jlora.Rule(pattern="kernel", layout=jlora.KernelLayout(in_axes=(0, 1)))
  _check(f, p, jlora.LoraConfig(rank=3, targets=[rule]), jax.random.normal(KEY, (2, 3, 4, 5)))


def test_einsum_with_per_head_batch_axis():
  m = nn.Einsum(shape=(4, 8, 6), einsum_str="bhd,hdo->bho", use_bias=False)
  f, p = linen(m, jnp.ones((2, 4, 8)))
  x = jax.random.normal(KEY, (2, 4, 8))
  lp = _check(f, p, jlora.LoraConfig(rank=2, targets="kernel"), x, layout_fn=f)
  assert lp["kernel"].spec.batch_axes == (0,)
  assert lp["kernel"].a.shape == (4, 8, 2) and lp["kernel"].b.shape == (4, 2, 6)


def test_einsum_reshaped_attention_kernel():
  # A (d, heads*head_dim) kernel reshaped to (d, heads, head_dim) inside the layer.
  params = {"wq": jax.random.normal(KEY, (8, 12))}
  f = lambda p, x: jnp.einsum("btd,dhk->bthk", x, p["wq"].reshape(8, 3, 4))
  x = jax.random.normal(KEY, (2, 5, 8))
  _check(f, params, jlora.LoraConfig(rank=2, targets="wq"), x)


@pytest.mark.parametrize("strides,padding", [((1, 1), "SAME"), ((2, 1), "VALID")])
def test_conv2d(strides, padding):
  m = nn.Conv(features=6, kernel_size=(3, 3), strides=strides, padding=padding)
  f, p = linen(m, jnp.ones((2, 9, 9, 4)))
  x = jax.random.normal(KEY, (2, 9, 9, 4))
  lp = _check(f, p, jlora.LoraConfig(rank=2, targets="kernel"), x, layout_fn=f)
  assert lp["kernel"].a.shape == (3, 3, 4, 2) and lp["kernel"].b.shape == (2, 6)


def test_conv1d_nchw_dimension_numbers():
  w = jax.random.normal(KEY, (6, 4, 3))  # OIW
  f = lambda p, x: jax.lax.conv_general_dilated(x, p["w"], (1,), "SAME", dimension_numbers=("NCW", "OIW", "NCW"))
  x = jax.random.normal(KEY, (2, 4, 10))
  lp = _check(f, {"w": w}, jlora.LoraConfig(rank=2, targets="w"), x, layout_fn=f)
  assert lp["w"].spec.in_axes == (1, 2)


def test_embedding_lookup_and_tied_attend():
  class Tied(nn.Module):
    @nn.compact
    def __call__(self, ids):
      emb = nn.Embed(20, 6)
      h = emb(ids)
      return emb.attend(jnp.tanh(h))

  ids = jnp.array([[1, 5, 19], [0, 2, 2]])
  f, p = linen(Tied(), ids)
  lp = _check(f, p, jlora.LoraConfig(rank=2, targets=".*/embedding"), ids)
  assert lp["Embed_0"]["embedding"].spec.layout.embedding
  assert lp["Embed_0"]["embedding"].a.shape == (20, 2)


def test_embedding_init_matches_peft():
  p = {"embed": {"embedding": jnp.ones((20, 6))}}
  lp = jlora.init(KEY, p, jlora.LoraConfig(rank=2, targets=".*/embedding"))
  w = lp["embed"]["embedding"]
  assert (np.asarray(w.a) == 0).all() and np.asarray(w.b).std() > 0.3


class ScanMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    body = nn.scan(
        lambda mdl, c, _: (jnp.tanh(nn.Dense(8)(c)), None),
        variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return body(self, x, None)[0]


def test_linen_scan_stacked_kernels():
  f, p = linen(ScanMLP(), jnp.ones((2, 8)))
  x = jax.random.normal(KEY, (2, 8))
  paths = [k for k in jax.tree.leaves_with_path(p)]
  lp = _check(f, p, jlora.LoraConfig(rank=2, targets=".*kernel"), x, layout_fn=f)
  (w,) = [x for x in jax.tree.leaves(lp, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
          if isinstance(x, jlora.LoraWeight)]
  assert w.spec.batch_axes == (0,) and w.a.shape == (3, 8, 2) and w.b.shape == (3, 2, 8)
  assert paths


def test_lax_scan_and_python_indexing_of_stacked_kernel():
  params = {"w": jax.random.normal(KEY, (3, 8, 8)) / 3}

  def scanned(p, x):
    return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, p["w"])[0]

  def indexed(p, x):
    for i in range(3):
      x = jnp.tanh(x @ p["w"][i])
    return x

  x = jax.random.normal(KEY, (2, 8))
  lay = jlora.KernelLayout(in_axes=(1,), batch_axes=(0,))
  cfg = jlora.LoraConfig(rank=2, targets=[jlora.Rule(pattern="w", layout=lay)])
  _check(scanned, params, cfg, x)
  _check(indexed, params, cfg, x)
  assert jlora.infer_layout(scanned, params, x) == {"w": lay}
  assert jlora.infer_layout(indexed, params, x) == {"w": lay}


def test_dynamic_layer_index():
  params = {"w": jax.random.normal(KEY, (3, 8, 8)) / 3}
  f = lambda p, x, i: x @ p["w"][i]
  lay = jlora.KernelLayout(in_axes=(1,), batch_axes=(0,))
  cfg = jlora.LoraConfig(rank=2, targets=[jlora.Rule(pattern="w", layout=lay)])
  _check(f, params, cfg, jax.random.normal(KEY, (2, 8)), jnp.int32(2))


def test_remat_and_checkpoint():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jnp.tanh(nn.Dense(8)(x))

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(2):
        x = nn.remat(Block)()(x)
      return x

  f, p = linen(Net(), jnp.ones((2, 8)))
  x = jax.random.normal(KEY, (2, 8))
  lp = _check(f, p, jlora.LoraConfig(rank=2, targets=".*kernel"), x)
  # Gradients through the remat'd low-rank path match those of the dense oracle.
  w = lp["CheckpointBlock_0"]["Dense_0"]["kernel"]

  def loss(a, dense):
    if dense:
      k = {**lp["CheckpointBlock_0"]["Dense_0"], "kernel": w.w0 + w.spec.scale * a @ w.b}
      return jnp.sum(f({**oracle_params(lp), "CheckpointBlock_0": {"Dense_0": k}}, x) ** 2)
    k = {**lp["CheckpointBlock_0"]["Dense_0"], "kernel": w.replace(a=a)}
    return jnp.sum(jlora.wrap(f)({**lp, "CheckpointBlock_0": {"Dense_0": k}}, x) ** 2)

  g = jax.jit(jax.grad(loss), static_argnums=1)
  assert_close(g(w.a, False), g(w.a, True), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [False, True])
def test_gradients_match_dense_oracle(fused):
  f, p = linen(nn.Dense(6), jnp.ones((3, 8)))
  x = jax.random.normal(KEY, (3, 8))
  lp = randomize(jlora.init(KEY, p, jlora.LoraConfig(rank=2, targets="kernel")), KEY)
  w = lp["kernel"]

  def lora_loss(a, b):
    wrapped = jlora.wrap(lambda p, x: f(p, x) * jnp.tanh(f(p, x)), fused_expansion=fused)
    return jnp.sum(jnp.sin(wrapped({**lp, "kernel": w.replace(a=a, b=b)}, x)))

  def dense_loss(a, b):
    k = w.w0 + w.spec.scale * a @ b
    y = f({**lp, "kernel": k}, x)
    return jnp.sum(jnp.sin(y * jnp.tanh(y)))

  ga = jax.jit(jax.grad(lora_loss, argnums=(0, 1)))(w.a, w.b)
  gd = jax.jit(jax.grad(dense_loss, argnums=(0, 1)))(w.a, w.b)
  for x1, x2 in zip(ga, gd):
    assert_close(x1, x2, **F32)


def test_bfloat16_base():
  m = nn.Dense(16, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  f, p = linen(m, jnp.ones((4, 32), jnp.bfloat16))
  x = jax.random.normal(KEY, (4, 32), jnp.bfloat16)
  cfg = jlora.LoraConfig(rank=4, targets="kernel")
  lp = jlora.init(KEY, p, cfg)
  assert lp["kernel"].a.dtype == jnp.float32 and lp["kernel"].w0.dtype == jnp.bfloat16
  base = jax.jit(f)(p, x)
  np.testing.assert_array_equal(np.asarray(jax.jit(jlora.wrap(f))(lp, x)), np.asarray(base))
  lp = randomize(lp, KEY)
  got = jax.jit(jlora.wrap(f))(lp, x)
  assert got.dtype == jnp.bfloat16
  # Reference: the same math in float64 (x·W0 + scale·(x·A)·B), then rounded to bf16.
  # The bf16 base matmul accumulates in bf16-rounded inputs; one bf16 ulp is 2^-8
  # relative, so allow 2 ulps of the output magnitude.
  x64 = np.asarray(x, np.float64)
  w = lp["kernel"]
  want = x64 @ np.asarray(w.w0, np.float64) + w.spec.scale * (x64 @ np.asarray(w.a, np.float64)) @ np.asarray(w.b, np.float64)
  want = want + np.asarray(p["bias"], np.float64)
  assert_close(got, want, rtol=2 * 2**-8, atol=2 * 2**-8 * np.abs(want).max())


def test_nnx_through_split_and_merge():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(8, 16, rngs=rngs)
      self.l2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.relu(self.l1(x)))

  graphdef, state = nnx.split(Model(nnx.Rngs(0)))
  f = lambda s, x: nnx.merge(graphdef, s)(x)
  x = jax.random.normal(KEY, (3, 8))
  lp = _check(f, state, jlora.LoraConfig(rank=2, targets=r"l\d/kernel"), x)
  assert jlora.count(lp).num_adapters == 2


def test_plain_function_with_closure_and_jit_inside():
  params = {"w": jax.random.normal(KEY, (8, 6))}
  inner = jax.jit(lambda x, w: jnp.dot(x, w))
  f = lambda p, x: inner(x, p["w"]) * 2.0
  _check(f, params, jlora.LoraConfig(rank=2, targets="w"), jax.random.normal(KEY, (3, 8)))


def test_scalar_scaled_kernel():
  params = {"w": jax.random.normal(KEY, (8, 6))}
  f = lambda p, x: x @ (p["w"] * 0.5) + x @ (-p["w"] / 4.0)
  _check(f, params, jlora.LoraConfig(rank=2, targets="w"), jax.random.normal(KEY, (3, 8)))


def test_cond_and_while_bodies():
  params = {"w": jax.random.normal(KEY, (8, 8)) / 3}

  def f(p, x):
    x = jax.lax.cond(x.sum() > 0, lambda x: x @ p["w"], lambda x: -(x @ p["w"]), x)
    return jax.lax.fori_loop(0, jnp.int32(x.shape[0]) * 0 + 2, lambda i, c: jnp.tanh(c @ p["w"]), x)

  _check(f, params, jlora.LoraConfig(rank=2, targets="w"), jax.random.normal(KEY, (3, 8)))


def test_unsupported_use_is_an_error_naming_the_path():
  params = {"w": jax.random.normal(KEY, (8, 6))}
  f = lambda p, x: x @ p["w"] + jnp.cumsum(p["w"], axis=0).sum()
  lp = jlora.init(KEY, params, jlora.LoraConfig(rank=2, targets="w"))
  with pytest.raises(jlora.LoraApplyError, match=r"'w' reaches `cumsum`.*on_unsupported='merge'"):
    jlora.wrap(f)(lp, jnp.ones((3, 8)))


def test_merge_on_the_fly_is_opt_in_and_exact():
  params = {"w": jax.random.normal(KEY, (8, 6))}
  f = lambda p, x: x @ p["w"] + jnp.cumsum(p["w"], axis=0).sum()
  lp = randomize(jlora.init(KEY, params, jlora.LoraConfig(rank=2, targets="w")), KEY)
  got = jax.jit(jlora.wrap(f, on_unsupported="merge"))(lp, jnp.ones((3, 8)))
  assert_close(got, f(oracle_params(lp), jnp.ones((3, 8))), rtol=1e-5, atol=1e-4)


def test_returning_the_kernel_is_an_error():
  lp = jlora.init(KEY, {"w": jnp.ones((4, 4))}, jlora.LoraConfig(rank=2, targets="w"))
  with pytest.raises(jlora.LoraApplyError, match="returns the LoRA kernel 'w'"):
    jlora.wrap(lambda p: p["w"])(lp)


def test_split_tree_passed_to_wrap_is_an_error():
  lp = jlora.init(KEY, {"w": jnp.ones((4, 4))}, jlora.LoraConfig(rank=2, targets="w"))
  adapters, _ = jlora.split(lp)
  with pytest.raises(jlora.LoraApplyError, match="combine"):
    jlora.wrap(lambda p, x: x @ p["w"])(adapters, jnp.ones((1, 4)))


def test_bad_on_unsupported():
  with pytest.raises(ValueError, match="on_unsupported"):
    jlora.wrap(lambda x: x, on_unsupported="ignore")


def test_dropout_only_with_key_and_matches_manual_mask():
  params = {"w": jax.random.normal(KEY, (8, 6))}
  f = lambda p, x: x @ p["w"]
  cfg = jlora.LoraConfig(rank=2, dropout=0.5, targets="w")
  lp = randomize(jlora.init(KEY, params, cfg), KEY)
  x = jax.random.normal(KEY, (64, 8))
  no_key = jlora.wrap(f)(lp, x)
  assert_close(no_key, f(oracle_params(lp), x), **F32)
  k1 = jlora.wrap(f)(lp, x, lora_rng=jax.random.key(7))
  k1b = jlora.wrap(f)(lp, x, lora_rng=jax.random.key(7))
  k2 = jlora.wrap(f)(lp, x, lora_rng=jax.random.key(8))
  np.testing.assert_array_equal(np.asarray(k1), np.asarray(k1b))
  assert not np.allclose(np.asarray(k1), np.asarray(k2))
  # The base path never sees dropout: y - x·W0 is the LoRA path on a dropped-out x,
  # whose rows are x ⊙ mask / (1 - p): each row is exactly 0 or 2·x on every element.
  w = lp["w"]
  lora_part = np.asarray(k1) - np.asarray(x @ w.w0)
  t = np.asarray(x) @ np.asarray(w.a)  # undropped
  assert not np.allclose(lora_part, w.spec.scale * t @ np.asarray(w.b), atol=1e-3)


def _shapes_produced(jaxpr) -> set:
  out = set()
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      out.add(tuple(v.aval.shape))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out |= _shapes_produced(sub)
  return out


@pytest.mark.parametrize("fused", [False, True])
def test_dense_kernel_is_never_built_forward_or_backward(fused):
  params = {"w": jax.random.normal(KEY, (37, 23))}
  f = lambda p, x: jnp.tanh(x @ p["w"])
  lp = randomize(jlora.init(KEY, params, jlora.LoraConfig(rank=2, targets="w")), KEY)
  x = jnp.ones((5, 37))
  adapters, frozen = jlora.split(lp)
  loss = lambda a, fr: jnp.sum(jlora.wrap(f, fused_expansion=fused)(jlora.combine(a, fr), x))
  fwd = jax.make_jaxpr(jlora.wrap(f, fused_expansion=fused))(lp, x).jaxpr
  bwd = jax.make_jaxpr(jax.grad(loss))(adapters, frozen).jaxpr
  assert (37, 23) not in _shapes_produced(fwd)
  assert (37, 23) not in _shapes_produced(bwd)
  # The check can fail: merging on the fly, or differentiating W0, does build one.
  merged = jax.make_jaxpr(jlora.wrap(lambda p, x: f(p, x) + jnp.cumsum(p["w"]).sum(),
                                     on_unsupported="merge"))(lp, x).jaxpr
  assert (37, 23) in _shapes_produced(merged)
  full = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(f(p, x))))(params).jaxpr
  assert (37, 23) in _shapes_produced(full)


def test_forward_mode_autodiff_with_unfused_expansion():
  params = {"w": jax.random.normal(KEY, (8, 6))}
  f = lambda p, x: jnp.tanh(x @ p["w"])
  lp = randomize(jlora.init(KEY, params, jlora.LoraConfig(rank=2, targets="w")), KEY)
  x, dx = jax.random.normal(KEY, (3, 8)), jnp.ones((3, 8))
  _, t = jax.jvp(lambda x: jlora.wrap(f, fused_expansion=False)(lp, x), (x,), (dx,))
  _, t_ref = jax.jvp(lambda x: f(oracle_params(lp), x), (x,), (dx,))
  assert_close(t, t_ref, **F32)
  with pytest.raises(ValueError, match="fused_expansion must be"):
    jlora.wrap(f, fused_expansion="yes")
