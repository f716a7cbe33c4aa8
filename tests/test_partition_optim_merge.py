"""split/combine, the optax mask, merge/unload and counting."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from helpers import assert_close, oracle_params, randomize


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name="up")(x))
    return nn.Dense(4, name="down")(x)


def setup(dtype=jnp.float32):
  m = MLP()
  x = jax.random.normal(jax.random.key(0), (16, 8)).astype(dtype)
  p = m.init(jax.random.key(1), x)["params"]
  p = jax.tree.map(lambda t: t.astype(dtype), p)
  f = lambda p, x: m.apply({"params": p}, x)
  lp = jlora.init(jax.random.key(2), p, jlora.LoraConfig(rank=4, alpha=8, targets=r".*/kernel"))
  return f, p, lp, x


def test_split_combine_round_trip_is_exact():
  _, _, lp, _ = setup()
  lp = randomize(lp, jax.random.key(3))
  adapters, frozen = jlora.split(lp)
  assert all(l is not None for l in jax.tree.leaves(adapters))
  assert len(jax.tree.leaves(adapters)) == 4  # A, B for two kernels
  assert len(jax.tree.leaves(frozen)) == 4  # two W0 and two biases
  back = jlora.combine(adapters, frozen)
  assert jax.tree.structure(back) == jax.tree.structure(lp)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(lp)):
    assert x is y


def test_split_errors():
  with pytest.raises(ValueError, match="holds no LoraWeight"):
    jlora.split({"w": jnp.ones(3)})
  _, _, lp, _ = setup()
  with pytest.raises(ValueError, match="different trees"):
    jlora.combine(jlora.split(lp)[0], {"up": {"kernel": jnp.ones((8, 32)), "bias": jnp.ones(32)},
                                      "down": {"kernel": jnp.ones((32, 4)), "bias": jnp.ones(4)}})


def _train(lp, f, x, steps=5, full_tree=False):
  tx = jlora.optimizer(optax.adamw(1e-2, weight_decay=0.1), lp)
  y = jnp.ones((16, 4))

  def loss(adapters, frozen):
    return jnp.mean((jlora.wrap(f)(jlora.combine(adapters, frozen), x) - y) ** 2)

  adapters, frozen = jlora.split(lp)
  if full_tree:
    state = tx.init(lp)

    @jax.jit
    def step(lp, state):
      g = jax.grad(lambda p: jnp.mean((jlora.wrap(f)(p, x) - y) ** 2))(lp)
      u, state = tx.update(g, state, lp)
      return optax.apply_updates(lp, u), state

    for _ in range(steps):
      lp, state = step(lp, state)
    return lp, state
  state = tx.init(adapters)

  @jax.jit
  def step(adapters, state):
    g = jax.grad(loss)(adapters, frozen)
    u, state = tx.update(g, state, adapters)
    return optax.apply_updates(adapters, u), state

  for _ in range(steps):
    adapters, state = step(adapters, state)
  return jlora.combine(adapters, frozen), state


@pytest.mark.parametrize("full_tree", [False, True])
def test_only_adapters_train_and_w0_is_bit_identical(full_tree):
  f, p, lp, x = setup()
  new, state = _train(lp, f, x, full_tree=full_tree)
  for path in (("up", "kernel"), ("down", "kernel")):
    old_w, new_w = lp[path[0]][path[1]], new[path[0]][path[1]]
    np.testing.assert_array_equal(np.asarray(old_w.w0), np.asarray(new_w.w0))
    assert not np.array_equal(np.asarray(old_w.a), np.asarray(new_w.a))
    assert not np.array_equal(np.asarray(old_w.b), np.asarray(new_w.b))
  np.testing.assert_array_equal(np.asarray(lp["up"]["bias"]), np.asarray(new["up"]["bias"]))
  # The optimizer state holds moments for A and B only: 2 moments x (A, B) x 2 layers.
  n_adapter = jlora.count(lp).trainable
  state_elems = sum(np.size(t) for t in jax.tree.leaves(state) if np.ndim(t) > 0)
  assert state_elems == 2 * n_adapter


def test_optimizer_state_is_empty_for_frozen_leaves():
  _, _, lp, _ = setup()
  tx = jlora.optimizer(optax.adam(1e-3), lp)
  state = tx.init(lp)
  shapes = sorted(tuple(t.shape) for t in jax.tree.leaves(state) if np.ndim(t) > 0)
  assert shapes == sorted([(8, 4), (4, 32), (32, 4), (4, 4)] * 2)


def test_optimizer_errors():
  with pytest.raises(ValueError, match="hold no adapter factors"):
    jlora.optimizer(optax.adam(1e-3), {"w": jnp.ones(3)})
  with pytest.raises(ValueError, match="optax.GradientTransformation"):
    jlora.optimizer("adam", {"w": jnp.ones(3)})


def test_merge_matches_wrapped_float32():
  f, _, lp, x = setup()
  lp = randomize(lp, jax.random.key(5))
  merged = jlora.merge(lp)
  assert jax.tree.structure(merged) == jax.tree.structure(jlora.unload(lp))
  # Both are float32 evaluations of the same function; they differ only by summation order.
  assert_close(jax.jit(f)(merged, x), jax.jit(jlora.wrap(f))(lp, x), rtol=1e-5, atol=1e-5)
  assert_close(merged["up"]["kernel"], oracle_params(lp)["up"]["kernel"], rtol=1e-6, atol=1e-6)


def test_merge_bfloat16_is_computed_in_float32_and_cast_once():
  f, _, lp, x = setup(jnp.bfloat16)
  lp = randomize(lp, jax.random.key(5), scale=0.05)
  merged = jlora.merge(lp)
  assert merged["up"]["kernel"].dtype == jnp.bfloat16
  # Merge = one rounding of the float64 oracle to bf16: bit-identical to rounding it ourselves.
  want = jnp.asarray(oracle_params(lp)["up"]["kernel"]).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(merged["up"]["kernel"], np.float32), np.asarray(want, np.float32))
  # Merged vs unmerged forward in bf16: the merged kernel is rounded to bf16 (rel 2^-9) and
  # the bf16 matmuls round differently; outputs agree to a few bf16 ulps of their scale.
  got, ref = jax.jit(f)(merged, x), jax.jit(jlora.wrap(f))(lp, x)
  scale = float(np.abs(np.asarray(ref, np.float32)).max())
  assert_close(got, ref, rtol=0, atol=4 * 2**-8 * scale)


def test_unload_is_exact():
  _, p, lp, _ = setup()
  back = jlora.unload(randomize(lp, jax.random.key(0)))
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(p)):
    assert x is y


def test_count():
  _, _, lp, _ = setup()
  c = jlora.count(lp)
  assert c.trainable == 4 * (8 + 32) + 4 * (32 + 4)
  assert c.frozen == 8 * 32 + 32 + 32 * 4 + 4
  assert c.adapter_bytes == 4 * c.trainable
  assert "trainable params: 304 || all params: 724" in str(c)
  adapters, frozen = jlora.split(lp)
  assert jlora.count(adapters).trainable == c.trainable and jlora.count(adapters).frozen == 0
