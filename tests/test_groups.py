"""Adapted matmuls that read one input (q/k/v, gate/up) are served under one custom VJP.

``x·[A_q A_k A_v]`` is one matmul, and so are ``dA`` and the input's gradient in
the backward pass, which rebuilds (or keeps) ``x`` once for the group. Checked
against a dense float32 oracle (``W0 + scale·A·B`` built explicitly and
differentiated by JAX) and against plain autodiff of the low-rank path, with
different ranks and alphas per layer, kernels stored in other orientations
(``(heads, head_dim, d)`` read through a transpose) and per-layer casts of the
input and the kernels (what Flax's ``Dense`` does in bf16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jlora
from helpers import assert_close, randomize

N, D, HEADS, HD, F = 24, 16, 2, 4, 12


def _norm(x, g):
  return x * lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * g


# The axis of each kernel that a layer contracts with its input.
IN_AXIS = {"q": 0, "k": 0, "v": 2, "up": 0, "gate": 0}


def _model(p, x, cast=None):
  """q: (D, D); k: (D, HEADS, HD); v: stored (HEADS, HD, D), contracted over its last axis;
  a gated MLP's up and gate. With ``cast``, each layer casts its input and kernel itself (as
  Flax's ``Dense`` does)."""
  def linear(name, h):
    hh, w = h, p[name]
    if cast is not None:
      hh, w = hh.astype(cast), w.astype(cast)
    y = lax.dot_general(hh, w, (((1,), (IN_AXIS[name],)), ((), ())))
    return y.reshape(N, -1).astype(jnp.float32)

  h = _norm(x, p["g"])
  q, k, v = linear("q", h), linear("k", h), linear("v", h)
  h = _norm(x + q, p["g"])
  z = jax.nn.silu(linear("gate", h)) * linear("up", h)
  return jnp.sum(jnp.tanh(q) * jnp.concatenate([k, v], -1)) + jnp.sum(jnp.tanh(z) ** 2)


def _params():
  k = iter(jax.random.split(jax.random.key(3), 8))
  n = lambda *s: jax.random.normal(next(k), s) / np.sqrt(D)
  return {"g": 1.0 + 0.1 * jax.random.normal(next(k), (D,)), "q": n(D, D), "k": n(D, HEADS, HD),
          "v": n(HEADS, HD, D), "up": n(D, F), "gate": n(D, F)}


def _lora():
  rules = [jlora.Rule(pattern="q", rank=2, alpha=4.0), jlora.Rule(pattern="k", rank=4, alpha=2.0, layout=jlora.KernelLayout(in_axes=(0,))),
           jlora.Rule(pattern="v", rank=3, layout=jlora.KernelLayout(in_axes=(2,))),
           jlora.Rule(pattern="up", rank=3), jlora.Rule(pattern="gate")]
  cfg = jlora.LoraConfig(rank=2, alpha=8.0, targets=rules)
  return randomize(jlora.init(jax.random.key(1), _params(), cfg), jax.random.key(2), scale=0.3)


def _dense(lp, x):
  """The oracle: each kernel W0 + scale·(A⊗B) built densely, then the same model."""
  def kernel(w):
    spec = w.spec
    a = jnp.moveaxis(w.a, -1, 0).reshape(spec.rank, -1)  # (r, in)
    b = w.b.reshape(spec.rank, -1)  # (r, out)
    delta = (a.T @ b) * spec.scale  # (in, out) over the layout's axes
    ins = [spec.shape[i] for i in spec.in_axes]
    outs = [spec.shape[i] for i in spec.out_axes]
    delta = delta.reshape(*ins, *outs)
    order = list(spec.in_axes) + list(spec.out_axes)
    return w.w0 + jnp.transpose(delta, np.argsort(order))

  dense = jax.tree.map(lambda w: kernel(w) if isinstance(w, jlora.LoraWeight) else w, lp,
                       is_leaf=lambda w: isinstance(w, jlora.LoraWeight))
  return _model(dense, x)


def _grads(loss, lp, x):
  adapters, frozen = jlora.split(lp)
  return jax.value_and_grad(lambda a: loss(jlora.combine(a, frozen), x))(adapters)


def _dot_shapes(fn, *args) -> list:
  """Output shapes of every ``dot_general`` in ``fn``'s jaxpr, nested jaxprs included."""
  shapes = []

  def walk(j):
    for e in j.eqns:
      if e.primitive.name == "dot_general":
        shapes.append(e.outvars[0].aval.shape)
      for v in e.params.values():
        for sub in v if isinstance(v, (tuple, list)) else (v,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            walk(inner)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return shapes


@pytest.fixture(scope="module")
def setup():
  return _lora(), jax.random.normal(jax.random.key(4), (N, D))


def test_grouped_layers_match_the_dense_oracle(setup):
  lp, x = setup
  got_loss, got = _grads(jlora.wrap(_model), lp, x)
  want_loss, want = _grads(_dense, lp, x)
  assert_close(got_loss, want_loss, rtol=2e-6, atol=0)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    # Sums of O(1) terms in another order: relative to each array's largest entry.
    assert_close(g, w, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(np.asarray(w)))))


def test_grouped_layers_match_plain_autodiff(setup):
  lp, x = setup
  got_loss, got = _grads(jlora.wrap(_model), lp, x)
  want_loss, want = _grads(jlora.wrap(_model, fused_expansion=False), lp, x)
  assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert_close(g, w, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(np.asarray(w)))))


def test_one_matmul_per_group_forward_and_backward(setup):
  """q/k/v (ranks 2+4+3) read one input, up/gate (3+2) another: each group has one ``t = h·A_cat``
  of width 9 (5) and one ``dA_cat = hᵀ·dt``; plain autodiff has neither."""
  lp, x = setup
  adapters, frozen = jlora.split(lp)
  step = lambda fn: (lambda a: jax.grad(lambda a: fn(jlora.combine(a, frozen), x))(a))
  grouped = _dot_shapes(step(jlora.wrap(_model)), adapters)
  plain = _dot_shapes(step(jlora.wrap(_model, fused_expansion=False)), adapters)
  for r in (9, 5):
    assert grouped.count((N, r)) == 1 and grouped.count((D, r)) == 1
    assert plain.count((N, r)) == 0
  # x·A and dA: one matmul per group instead of one per layer.
  assert len(plain) - len(grouped) >= 2 * (3 - 1) + 2 * (2 - 1)


def test_layers_that_cast_their_input_and_kernel_are_grouped(setup):
  lp, x = setup
  bf16 = lambda p, x: _model(p, x, cast=jnp.bfloat16)
  adapters, frozen = jlora.split(lp)
  step = lambda fn: (lambda a: jax.grad(lambda a: fn(jlora.combine(a, frozen), x))(a))
  assert _dot_shapes(step(jlora.wrap(bf16)), adapters).count((N, 9)) == 1
  got_loss, got = _grads(jlora.wrap(bf16), lp, x)
  want_loss, want = _grads(jlora.wrap(bf16, fused_expansion=False), lp, x)
  # bf16 matmuls (8 mantissa bits) summed in another order on both sides.
  assert_close(got_loss, want_loss, rtol=2e-2, atol=0)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert_close(g, w, rtol=0, atol=3e-2 * float(np.max(np.abs(np.asarray(w)))))


def test_zero_b_group_is_the_base_exactly(setup):
  lp, x = setup
  zero = jax.tree.map(lambda w: w.replace(b=jnp.zeros_like(w.b)) if isinstance(w, jlora.LoraWeight) else w,
                      lp, is_leaf=lambda w: isinstance(w, jlora.LoraWeight))
  base = jlora.unload(zero)
  assert float(jlora.wrap(_model)(zero, x)) == float(_model(base, x))
