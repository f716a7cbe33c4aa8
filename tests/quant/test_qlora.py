"""QLoRA through the low-rank apply path, against dense oracles built from the dequantized base."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from helpers import assert_close, oracle_kernel, oracle_params, randomize

KEY = jax.random.key(0)
# float32 vs a float64 oracle over the same (dequantized) base: only f32 rounding of O(10)-sized
# sums differs, as in tests/test_apply.py.
F32 = dict(rtol=2e-5, atol=2e-5)
STACKED = jlora.KernelLayout(in_axes=(1,), batch_axes=(0,))


def linen(module, x):
  params = module.init(KEY, x)["params"]
  return (lambda p, x: module.apply({"params": p}, x)), params


def scanned(layers=3, d=128, seed=0):
  """A scanned stack of (in, out) kernels: an MLP whose down projection is not adapted."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = {"layers": {"up": jax.random.normal(k1, (layers, d, 2 * d)) / 12,
                       "down": jax.random.normal(k2, (layers, 2 * d, d)) / 16},
            "out": jax.random.normal(k3, (d, 70)) / 10}

  def f(p, x):
    def body(h, w):
      return h + jnp.tanh(h @ w["up"]) @ w["down"], None

    h, _ = jax.lax.scan(body, x, p["layers"])
    return h @ p["out"]

  layout = {"layers/up": STACKED, "layers/down": STACKED, "out": jlora.KernelLayout(in_axes=(0,))}
  return f, params, layout


CASES = {
    # name: (function, params, layout, quantize targets, LoRA targets, input shape)
    "dense": lambda: (*linen(nn.Dense(96), jnp.ones((3, 128))), None, "kernel", "kernel", (3, 128)),
    "dense_general": lambda: (*linen(nn.DenseGeneral((4, 24)), jnp.ones((3, 64))), None, "kernel", "kernel", (3, 64)),
    "stored_transposed": lambda: ((lambda p, x: x @ p["w"].T), {"w": jax.random.normal(KEY, (48, 100)) / 10},
                                  {"w": jlora.KernelLayout(in_axes=(1,))}, "w", "w", (3, 100)),
    "scanned": lambda: (*scanned(), r"layers/.*|out", r"layers/up|out", (4, 128)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_qlora_matches_dense_oracle_and_gradients(name):
  f, p, layout, qtargets, ltargets, shape = CASES[name]()
  x = jax.random.normal(jax.random.key(5), shape)
  if layout is None and name == "dense_general":
    layout = jlora.infer_layout(f, p, x)
  qp = jlora.quantize(p, targets=qtargets, layout=layout)
  dense = jlora.dequantize(qp)
  wf, jf = jax.jit(jlora.wrap(f)), jax.jit(f)  # one compile per tree structure
  base = jf(dense, x)
  # Frozen 4-bit kernels without adapters: decoded at their use.
  assert_close(wf(qp, x), base, **F32)
  lp0 = jlora.init(jax.random.key(1), qp, jlora.LoraConfig(rank=4, alpha=8, targets=ltargets), layout=layout)
  # B = 0: the base output (same decode, same consumer).
  np.testing.assert_allclose(np.asarray(wf(lp0, x)), np.asarray(base), rtol=1e-6, atol=1e-6)
  lp = randomize(lp0, jax.random.key(2), scale=0.2)
  want = jf(oracle_params(jlora.dequantize(lp)), x)
  got = wf(lp, x)
  assert_close(got, want, **F32)
  assert not np.allclose(np.asarray(got), np.asarray(base), atol=1e-3), "adapter had no effect"
  # merge: float32 decode + delta, dense kernels in the compute dtype, every leaf plain.
  merged = jlora.merge(lp)
  assert not any(isinstance(t, jlora.NF4Weight) for t in jax.tree.leaves(
      merged, is_leaf=lambda t: isinstance(t, jlora.NF4Weight)))
  assert_close(jf(merged, x), want, **F32)
  if name != "scanned":  # gradients and residuals: on the scanned stack (the QLoRA layout)
    return
  # Gradients w.r.t. the adapters equal those over the dense (dequantized) base.
  adapters, frozen = jlora.split(lp)
  _, dense_frozen = jlora.split(jlora.dequantize(lp))
  loss = lambda a, fr: jnp.sum(jlora.wrap(f)(jlora.combine(a, fr), x) ** 2)
  grad = jax.jit(jax.grad(loss))
  for a, b in zip(jax.tree.leaves(grad(adapters, frozen)), jax.tree.leaves(grad(adapters, dense_frozen))):
    # f32 autodiff vs f32 autodiff with other fusions: sums of O(|g|max) terms round differently.
    assert_close(a, b, rtol=1e-4, atol=2e-6 * float(np.abs(np.asarray(b)).max()))
  # Nothing dequantized is saved for the backward pass: no floating residual of a kernel's size.
  vjp = jax.jit(lambda a, fr: jax.vjp(lambda a: loss(a, fr), a)[1])(adapters, frozen)
  per_layer = [int(np.prod(w.format.shape[w.format.stack:]))  # one layer's kernel
               for w in jax.tree.leaves(qp, is_leaf=lambda t: isinstance(t, jlora.NF4Weight))
               if isinstance(w, jlora.NF4Weight)]
  floats = [r for r in jax.tree.leaves(vjp) if jnp.issubdtype(r.dtype, jnp.floating)]
  assert floats and not any(r.size >= min(per_layer) for r in floats), sorted(r.shape for r in floats)


def test_bfloat16_compute_and_merge():
  f, p, layout = scanned()
  p = jax.tree.map(lambda t: t.astype(jnp.bfloat16), p)
  qp = jlora.quantize(p, targets=r"layers/.*", layout=layout)
  assert qp["layers"]["up"].dtype == jnp.bfloat16
  x = jax.random.normal(KEY, (4, 128), jnp.bfloat16)
  # The consumer decodes to bfloat16 exactly as dequantize does; same ops otherwise.
  np.testing.assert_array_equal(np.asarray(jax.jit(jlora.wrap(f))(qp, x).astype(jnp.float32)),
                                np.asarray(jax.jit(f)(jlora.dequantize(qp), x).astype(jnp.float32)))
  # compute_dtype: a float32 checkpoint decoded to bfloat16 in the apply path.
  q32 = jlora.quantize(jax.tree.map(lambda t: t.astype(jnp.float32), p), targets=r"layers/.*", layout=layout,
                       compute_dtype="bfloat16")
  assert q32["layers"]["up"].dtype == jnp.bfloat16 and jlora.dequantize(q32)["layers"]["up"].dtype == jnp.float32
  lp = randomize(jlora.init(KEY, qp, jlora.LoraConfig(rank=4, targets="layers/up"), layout=layout), KEY)
  merged = jlora.merge(lp)["layers"]["up"]
  assert merged.dtype == jnp.bfloat16
  # float32 decode + float32 delta, one cast: the float64 oracle rounded to bfloat16, except where
  # float32 rounding of the delta meets a bfloat16 tie (then one bfloat16 ulp). A detour through
  # a bfloat16 base would round twice and miss in a sizeable fraction of the elements.
  w = lp["layers"]["up"]
  exact = oracle_kernel(w.replace(w0=w.w0.dequantize(jnp.float32)))
  want = np.asarray(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))
  got = np.asarray(merged.astype(jnp.float32))
  ulp = np.asarray(jnp.asarray(np.abs(want) * 2.0**-7, jnp.float32))  # >= one bfloat16 ulp
  assert np.all(np.abs(got - want) <= ulp) and np.mean(got != want) < 1e-3, np.mean(got != want)
  detour = np.asarray((w.w0.dequantize(jnp.bfloat16).astype(jnp.float32) + (exact - np.asarray(
      w.w0.dequantize(jnp.float32), np.float64)).astype(np.float32)).astype(jnp.bfloat16).astype(jnp.float32))
  assert np.mean(detour != want) > 10 * max(np.mean(got != want), 1e-4)


def test_tree_plumbing_optimizer_count_and_merge_quantized():
  f, p, layout = scanned()
  qp = jlora.quantize(p, targets=r"layers/.*", layout=layout)
  lp = jlora.init(KEY, qp, jlora.LoraConfig(rank=4, targets="layers/up"), layout=layout)
  c = jlora.count(lp)
  stored = sum(x.nbytes for x in jax.tree.leaves(qp["layers"]))
  assert c.frozen_bytes == stored + p["out"].nbytes and c.trainable == 3 * (128 + 256) * 4
  adapters, frozen = jlora.split(lp)
  assert adapters["layers"]["down"] is None and isinstance(frozen["layers"]["down"], jlora.NF4Weight)
  back = jlora.combine(adapters, frozen)
  assert all(a is b for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lp)))
  # A few optimizer steps move only the adapters and lower the loss.
  tx = jlora.optimizer(optax.adam(1e-2), adapters)
  state = tx.init(adapters)
  x = jax.random.normal(KEY, (8, 128))
  loss = lambda a: jnp.mean((jlora.wrap(f)(jlora.combine(a, frozen), x) - 1.0) ** 2)
  step = jax.jit(lambda a, s: (lambda g: tx.update(g, s, a))(jax.grad(loss)(a)))
  first = float(loss(adapters))
  for _ in range(3):
    u, state = step(adapters, state)
    adapters = optax.apply_updates(adapters, u)
  assert float(loss(adapters)) < first
  trained = jlora.combine(adapters, frozen)
  # merge_quantized: back to 4 bits, with the rounding error it reports, measured independently.
  requant, errors = jlora.merge_quantized(trained)
  assert set(errors) == {"layers/up"} and isinstance(requant["layers"]["up"], jlora.NF4Weight)
  assert requant["layers"]["down"] is qp["layers"]["down"]
  w = trained["layers"]["up"]
  exact = oracle_kernel(w.replace(w0=w.w0.dequantize(jnp.float32)))
  err = np.asarray(requant["layers"]["up"].dequantize(jnp.float32), np.float64) - exact
  delta = exact - np.asarray(w.w0.dequantize(jnp.float32), np.float64)
  e = errors["layers/up"]
  assert e.max_abs == pytest.approx(np.abs(err).max(), rel=1e-4)
  assert e.relative_to_delta == pytest.approx(np.linalg.norm(err) / np.linalg.norm(delta), rel=1e-3)
  # requantizing the exact merge is the quantization of the exact merge
  direct = jlora.quantize({"w": jnp.asarray(exact, jnp.float32)}, targets="w", layout={"w": STACKED})["w"]
  np.testing.assert_array_equal(np.asarray(direct.packed), np.asarray(requant["layers"]["up"].packed))


def test_adapters_move_between_quantized_and_dense_bases(tmp_path):
  f, p32, layout = scanned(seed=3)
  assert jlora.fingerprint(jlora.quantize(p32, targets=r"layers/.*|out", layout=layout)) == jlora.fingerprint(p32)
  for dtype in (jnp.bfloat16,):
    f, p, layout = scanned(seed=3)
    p = jax.tree.map(lambda t: t.astype(dtype), p)
    qp = jlora.quantize(p, targets=r"layers/.*|out", layout=layout)
    assert jlora.fingerprint(qp) == jlora.fingerprint(p)
    assert jlora.fingerprint(jlora.quantize(p, targets=r"layers/.*", layout=layout, double_quant=False)) == \
        jlora.fingerprint(p)
    cfg = jlora.LoraConfig(rank=4, targets=r"layers/up|out")
    q_lora = randomize(jlora.init(KEY, qp, cfg, layout=layout), KEY)
    d = jlora.save_adapter(str(tmp_path / f"q-{jnp.dtype(dtype).name}"), q_lora, base_model="toy")
    on_dense = jlora.load_adapter(d, p)  # trained with QLoRA, loaded onto the dense base
    assert jlora.fingerprint(on_dense) == jlora.fingerprint(p)
    for path in ("layers/up", "out"):
      a, b = jlora._checkpoint.adapter_weights(on_dense)[path], jlora._checkpoint.adapter_weights(q_lora)[path]
      np.testing.assert_array_equal(np.asarray(a.a), np.asarray(b.a))
    d2 = jlora.save_adapter(str(tmp_path / f"d-{jnp.dtype(dtype).name}"), on_dense)
    on_q = jlora.load_adapter(d2, qp)  # and back onto the 4-bit base
    assert isinstance(on_q["layers"]["up"].w0, jlora.NF4Weight)
    x = jax.random.normal(KEY, (2, 128), dtype)
    np.testing.assert_array_equal(np.asarray(jlora.wrap(f)(on_q, x).astype(jnp.float32)),
                                  np.asarray(jlora.wrap(f)(q_lora, x).astype(jnp.float32)))
  # Another base is refused, whatever its storage.
  other = jax.tree.map(lambda t: t + 0.3 * jax.random.normal(jax.random.key(8), t.shape, t.dtype), p)
  with pytest.raises(jlora.AdapterMismatchError, match="fingerprint"):
    jlora.load_adapter(d, jlora.quantize(other, targets=r"layers/.*", layout=layout))


def test_bad_input_names_the_path():
  p = {"a": {"kernel": jnp.ones((64, 8))}, "b": {"bias": jnp.ones(8)}, "i": {"kernel": jnp.ones((4, 4), jnp.int32)},
       "emb": {"embedding": jnp.ones((10, 8))}, "s": {"kernel": jnp.ones((2, 64, 8))}}
  for bs in (48, 16, 8192):
    with pytest.raises(ValueError, match=r"blocksize must be a power of two in 32\.\.4096"):
      jlora.quantize(p, targets="a/kernel", blocksize=bs)
  with pytest.raises(ValueError, match=r"quant_type must be one of"):
    jlora.quantize(p, targets="a/kernel", quant_type="int4")
  with pytest.raises(ValueError, match=r"'b/bias' .* is a float32 array of shape \(8,\), not a floating kernel"):
    jlora.quantize(p, targets="b/bias")
  with pytest.raises(ValueError, match=r"'i/kernel' .* int32 array"):
    jlora.quantize(p, targets="i/kernel")
  with pytest.raises(ValueError, match=r"'emb/embedding' is an embedding table"):
    jlora.quantize(p, targets="emb/embedding")
  with pytest.raises(ValueError, match=r"'s/kernel' has shape \(2, 64, 8\); only 2-D"):
    jlora.quantize(p, targets="s/kernel")
  with pytest.raises(ValueError, match=r"targets\[0\] \('nope'\) matched no parameter path"):
    jlora.quantize(p, targets="nope")
  with pytest.raises(ValueError, match=r"exclude\[0\] \('zzz'\) matched no parameter path"):
    jlora.quantize(p, targets="a/kernel", exclude="zzz")
  q = jlora.quantize(p, targets="a/kernel")
  with pytest.raises(ValueError, match=r"'a/kernel' .* is already quantized"):
    jlora.quantize(q, targets="a/kernel")
  lp = jlora.init(KEY, p, jlora.LoraConfig(rank=2, targets="a/kernel"))
  with pytest.raises(ValueError, match=r"'a/kernel' .* holds a LoRA adapter; quantize the base before jlora.init"):
    jlora.quantize(lp, targets="a/kernel")
  with pytest.raises(ValueError, match=r"stacked axes must lead"):
    jlora.quantize(p, targets="s/kernel", layout={"s/kernel": jlora.KernelLayout(in_axes=(1,), batch_axes=(2,))})
  with pytest.raises(ValueError, match=r"compute_dtype must be a floating dtype"):
    jlora.quantize(p, targets="a/kernel", compute_dtype="int8")
