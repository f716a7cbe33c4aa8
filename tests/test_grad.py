"""jlora.grad / jlora.value_and_grad: the gradient with respect to the adapters alone, on any LoRA tree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randomize

import jlora

X = jnp.asarray(np.random.default_rng(0).standard_normal((3, 64)), jnp.float32)


def _tree(quantized: bool):
  base = {"w": jnp.asarray(np.random.default_rng(1).standard_normal((64, 32)) * 0.1, jnp.float32),
          "bias": jnp.zeros(32)}
  if quantized:
    base = jlora.quantize(base, targets="w")
  lp = jlora.init(jax.random.key(0), base, jlora.LoraConfig(rank=4, alpha=8, targets="w"))
  return randomize(lp, jax.random.key(2))


def loss(p, x, scale=1.0):
  y = jlora.wrap(lambda p, x: x @ p["w"] + p["bias"])(p, x)
  return scale * jnp.sum(jnp.tanh(y) ** 2)


@pytest.mark.parametrize("quantized", [False, True])
def test_equals_jax_grad_on_the_split_adapters(quantized):
  lp = _tree(quantized)
  adapters, frozen = jlora.split(lp)
  value, want = jax.value_and_grad(lambda a: loss(jlora.combine(a, frozen), X))(adapters)
  got_value, got = jlora.value_and_grad(loss)(lp, X)
  assert float(got_value) == float(value)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  assert got["bias"] is None and got["w"].w0 is None  # the frozen part: no gradient at all
  # The gradient feeds jlora.optimizer as it is.
  import optax

  tx = jlora.optimizer(optax.sgd(0.1), adapters)
  updates, _ = tx.update(got, tx.init(adapters), adapters)
  assert jax.tree.structure(updates) == jax.tree.structure(adapters)


def test_a_quantized_tree_defeats_jax_grad_but_not_jlora_grad():
  lp = _tree(True)
  with pytest.raises(TypeError, match="grad requires real- or complex-valued inputs"):
    jax.grad(loss)(lp, X)
  assert jlora.grad(loss)(lp, X)["w"].a.shape == (64, 4)


def test_argnums_has_aux_and_keyword_arguments():
  lp = _tree(False)
  g1 = jlora.grad(lambda x, p: loss(p, x), argnums=1)(X, lp)
  (value, aux), g2 = jlora.value_and_grad(lambda p, x, scale: (loss(p, x, scale), "aux"), has_aux=True)(
      lp, X, scale=1.0)
  g3, aux3 = jlora.grad(lambda p: (loss(p, X), 7), has_aux=True)(lp)
  assert aux == "aux" and aux3 == 7
  for a, b, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), jax.tree.leaves(g3)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
  with pytest.raises(ValueError, match="argnums=2, but the function got 2 positional arguments"):
    jlora.grad(loss, argnums=2)(lp, X)
  with pytest.raises(ValueError, match="argnums must be one int"):
    jlora.grad(loss, argnums=(0, 1))
