"""The train step at the floor: what the low-rank path keeps for the backward pass.

A LoRA consumer under the custom-VJP lowering (the CPU default) saves no layer
input it can rebuild from values the model's own backward pass keeps anyway and
no dropout mask; gradients still match a dense oracle, with dropout on, in plain
and scanned (stacked-layer) models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jlora
from helpers import assert_close, oracle_kernel, randomize

KEY = jax.random.key(0)
# float32 vs a float32 dense oracle: the two differ by the rounding of sums in another
# order. Gradient entries are sums of cancelling O(10-50) terms, so the bound is relative
# to the largest entry of each array (2e-5), not to each entry.
F32 = dict(rtol=2e-5, atol=2e-5)


def close(actual, expected):
  scale = float(np.max(np.abs(np.asarray(expected))))
  assert_close(actual, expected, rtol=2e-5, atol=2e-5 * max(scale, 1.0))
N, D, H = 32, 8, 16  # tokens, model width, hidden width
RATE = 0.25


def _block(p, x):
  """One residual block: linear, RMSNorm, gated MLP (SiLU), linear."""
  h = x @ p["w1"]
  n = h * lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6) * p["g"]
  z = jax.nn.silu(n @ p["w2"]) * (n @ p["w3"])
  return x + jnp.tanh(z @ p["w4"])


def _params(key, stack=()):
  k = iter(jax.random.split(key, 5))
  shape = lambda *s: (*stack, *s)
  return {"w1": jax.random.normal(next(k), shape(D, H)) / np.sqrt(D),
          "g": 1.0 + 0.1 * jax.random.normal(next(k), shape(H)),
          "w2": jax.random.normal(next(k), shape(H, 24)) / np.sqrt(H),
          "w3": jax.random.normal(next(k), shape(H, 24)) / np.sqrt(H),
          "w4": jax.random.normal(next(k), shape(24, D)) / np.sqrt(24)}


def _scanned(p, x):
  def body(h, layer):
    return _block(layer, h), None
  return lax.scan(body, x, p)[0]


def _lora(stacked: bool):
  params = _params(jax.random.key(1), (3,) if stacked else ())
  layout = jlora.KernelLayout(in_axes=(1,), batch_axes=(0,)) if stacked else None
  rules = [jlora.Rule(pattern=r"w\d", layout=layout)] if stacked else r"w\d"
  cfg = jlora.LoraConfig(rank=2, alpha=4, dropout=RATE, targets=rules)
  return randomize(jlora.init(KEY, params, cfg), jax.random.key(2), scale=0.1)


def _dense_loss(fn, lp, x, masks):
  """The dense oracle: the kernel W0 + scale·A·B, LoRA dropout applied with the given masks."""
  keys = iter(masks) if masks is not None else None

  def linear(w, inp):
    if keys is None:
      return inp @ (w.w0 + w.spec.scale * w.a @ w.b)
    dropped = jnp.where(next(keys), inp / (1.0 - RATE), 0.0)
    return inp @ w.w0 + w.spec.scale * (dropped @ w.a) @ w.b

  return fn(linear, lp, x)


def _masks(rng, shapes):
  # jlora folds a per-use-site counter (1, 2, ...) into lora_rng, one use site per matmul
  # in program order (docs/design.md, "Dropout").
  return [jax.random.bernoulli(jax.random.fold_in(rng, i + 1), 1.0 - RATE, s) for i, s in enumerate(shapes)]


def _plain_block(linear, p, x):
  h = linear(p["w1"], x)
  n = h * lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6) * p["g"]
  z = jax.nn.silu(linear(p["w2"], n)) * linear(p["w3"], n)
  return x + jnp.tanh(linear(p["w4"], z))


@pytest.fixture(scope="module")
def plain():
  lp = _lora(stacked=False)
  x = jax.random.normal(jax.random.key(3), (N, D))
  return lp, x


@pytest.mark.parametrize("lowering", [None, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_gradients_match_dense_oracle(plain, lowering, dropout):
  lp, x = plain
  adapters, frozen = jlora.split(lp)
  rng = jax.random.key(11) if dropout else None
  wrapped = jlora.wrap(_block, fused_expansion=lowering)
  loss = lambda a: jnp.sum(jnp.sin(wrapped(jlora.combine(a, frozen), x, lora_rng=rng)))
  got = jax.jit(jax.grad(loss))(adapters)
  masks = _masks(rng, [(N, D), (N, H), (N, H), (N, 24)]) if dropout else None
  dense = lambda a: jnp.sum(jnp.sin(_dense_loss(_plain_block, jlora.combine(a, frozen), x, masks)))
  want = jax.grad(dense)(adapters)
  for name in ("w1", "w2", "w3", "w4"):
    close(got[name].a, want[name].a)
    close(got[name].b, want[name].b)
  if dropout:  # the forward pass used the same masks
    assert_close(jax.jit(wrapped)(lp, x, lora_rng=rng), _dense_loss(_plain_block, lp, x, masks), **F32)


def _float_residual_bytes(vjp, exclude_shapes, inputs=()) -> tuple[int, list]:
  """Bytes of the residuals a VJP holds, without the parameters and the given inputs."""
  seen, total, shapes = set(), 0, []
  for r in jax.tree.leaves(vjp):
    if (not hasattr(r, "dtype") or id(r) in seen or tuple(r.shape) in exclude_shapes
        or any(r is i for i in inputs)):
      continue
    seen.add(id(r))
    total += r.size * r.dtype.itemsize
    shapes.append((tuple(r.shape), str(r.dtype)))
  return total, shapes


def test_layer_inputs_and_masks_are_not_saved(plain):
  lp, x = plain
  adapters, frozen = jlora.split(lp)
  params_shapes = {tuple(l.shape) for l in jax.tree.leaves(lp)}
  rng = jax.random.key(11)

  def lora_residuals(lowering):
    wrapped = jlora.wrap(_block, fused_expansion=lowering)
    loss = lambda a: jnp.sum(jnp.sin(wrapped(jlora.combine(a, frozen), x, lora_rng=rng)))
    return _float_residual_bytes(jax.vjp(jax.jit(loss), adapters)[1], params_shapes, inputs=(x,))

  # The floor: the same block with frozen dense kernels, every activation gradient (here
  # with respect to x), no weight gradient.
  dense = {n: (jnp.asarray(oracle_kernel(w), jnp.float32) if isinstance(w, jlora.LoraWeight) else w)
           for n, w in lp.items()}
  floor, _ = _float_residual_bytes(jax.vjp(jax.jit(lambda x: jnp.sum(jnp.sin(_block(dense, x)))), x)[1],
                                   params_shapes)
  ours, shapes = lora_residuals(None)
  autodiff, autodiff_shapes = lora_residuals(False)
  # Beyond the floor, the low-rank path keeps t = x·A (N×rank per layer), a key and a scalar
  # per layer (and the first layer's input x, an argument: not counted); no normalised or
  # gated input, no mask.
  rank_sized = 4 * N * 2 * 4 + 4 * 16
  assert ours <= floor + rank_sized, (ours, floor, shapes)
  assert not any(dt == "bool" for _, dt in shapes), shapes
  # Plain autodiff saves the dropped-out inputs (or masks) of every layer: the check can fail.
  assert autodiff > floor + rank_sized + N * H * 4, (autodiff, floor, autodiff_shapes)


def test_scanned_layers_rebuild_inputs_and_match_oracle():
  lp = _lora(stacked=True)
  x = jax.random.normal(jax.random.key(3), (N, D))
  adapters, frozen = jlora.split(lp)
  rng = jax.random.key(5)
  loss = lambda a, r: jnp.sum(jnp.sin(jlora.wrap(_scanned)(jlora.combine(a, frozen), x, lora_rng=r)))
  got = jax.jit(jax.grad(loss))(adapters, None)

  def dense(a):
    full = jlora.combine(a, frozen)
    kernels = {n: (full[n].w0 + full[n].spec.scale * jnp.einsum("lir,lro->lio", full[n].a, full[n].b)
                   if isinstance(full[n], jlora.LoraWeight) else full[n]) for n in full}
    return jnp.sum(jnp.sin(_scanned(kernels, x)))

  want = jax.grad(dense)(adapters)
  for name in ("w1", "w2", "w3", "w4"):
    close(got[name].a, want[name].a)
    close(got[name].b, want[name].b)
  # Inside the scan body the normalised and gated inputs are rebuilt as well: the stacked
  # residuals hold no (layers, N, H) or (layers, N, 24) array beyond those of plain autodiff's
  # floor (h, the RMS, the two MLP branches).
  params_shapes = {tuple(l.shape) for l in jax.tree.leaves(lp)}
  ours, shapes = _float_residual_bytes(jax.vjp(jax.jit(lambda a: loss(a, rng)), adapters)[1], params_shapes)
  autodiff_loss = lambda a: jnp.sum(jnp.sin(jlora.wrap(_scanned, fused_expansion=False)(
      jlora.combine(a, frozen), x, lora_rng=rng)))
  theirs, _ = _float_residual_bytes(jax.vjp(jax.jit(autodiff_loss), adapters)[1], params_shapes)
  assert ours < theirs, (ours, theirs, shapes)
  assert not any(dt == "bool" for _, dt in shapes), shapes
