"""LoRAHub on a problem with a known answer, and the built-in searches on standard test functions.

Four rank-2 adapters on one linear layer; the few-shot targets come from the base plus a known
weighted sum of their updates. With ``method="cat"`` the composed update is exactly
``Σ w_i ΔW_i``, so the few-shot loss is a quadratic in ``w`` whose minimiser NumPy's least squares
gives in float64: every optimizer must find it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
import jlora.multi
from helpers import oracle_kernel, randomize

D, O, N = 6, 5, 4
TRUE_W = np.array([0.8, -0.5, 0.0, 0.3])


def _is_lw(x):
  return isinstance(x, jlora.LoraWeight)


@pytest.fixture(scope="module")
def task():
  params = {"w": jax.random.normal(jax.random.key(0), (D, O)) / 3}
  adapters = [randomize(jlora.init(jax.random.key(i), params, jlora.LoraConfig(rank=2, alpha=2 + i, targets="w")),
                        jax.random.key(10 + i)) for i in range(N)]
  x = np.asarray(jax.random.normal(jax.random.key(5), (12, D)), np.float64)
  w0 = np.asarray(params["w"], np.float64)
  deltas = [oracle_kernel(a["w"]) - w0 for a in adapters]  # float64 dense updates
  y = x @ (w0 + sum(c * d for c, d in zip(TRUE_W, deltas)))
  f = lambda p, x: x @ p["w"]
  loss = lambda tree: jnp.mean((jlora.wrap(f)(tree, jnp.asarray(x, jnp.float32)) - jnp.asarray(y, jnp.float32)) ** 2)
  # least squares in float64: residual y - x·w0 = Σ_i w_i (x·ΔW_i)
  feats = np.stack([(x @ d).reshape(-1) for d in deltas], axis=1)
  w_ls = np.linalg.lstsq(feats, (y - x @ w0).reshape(-1), rcond=None)[0]
  return dict(params=params, adapters=adapters, loss=loss, w_ls=w_ls, deltas=deltas, w0=w0)


class RandomSearch:
  """A user's own ask/tell optimizer: uniform random search."""

  def __init__(self, rng):
    self.rng, self.told = rng, 0

  def ask(self):
    return self.rng.uniform(-1.5, 1.5, N)

  def tell(self, x, value):
    self.told += 1


@pytest.mark.parametrize("optimizer", ["es", "cma", "adam"])
def test_finds_the_least_squares_weights(task, optimizer):
  np.testing.assert_allclose(task["w_ls"], TRUE_W, atol=1e-6)  # the data determine the weights
  opt = optax.adam(0.05) if optimizer == "adam" else optimizer
  res = jlora.multi.lorahub(task["loss"], task["adapters"], budget=250, optimizer=opt, l1=0.0, seed=1)
  # the quadratic is well conditioned here; 250 evaluations get within 2e-2 of the minimiser
  np.testing.assert_allclose(res.weights, TRUE_W, atol=2e-2)
  assert res.loss < 1e-3 * float(task["loss"](task["params"]))
  assert len(res.history) == 250 and min(res.history) == pytest.approx(res.objective)
  # the returned adapter is the composition at those weights: its update is Σ w_i ΔW_i (float64 oracle)
  got = oracle_kernel(res.params["w"]) - task["w0"]
  want = sum(c * d for c, d in zip(res.weights, task["deltas"]))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_seeded_bounded_and_pluggable(task):
  kw = dict(budget=30, l1=0.05)
  a = jlora.multi.lorahub(task["loss"], task["adapters"], optimizer="es", seed=3, **kw)
  b = jlora.multi.lorahub(task["loss"], task["adapters"], optimizer="es", seed=3, **kw)
  np.testing.assert_array_equal(a.weights, b.weights)
  assert a.history == b.history
  # the objective is the few-shot loss plus l1·mean|w|
  assert a.objective == pytest.approx(a.loss + 0.05 * np.mean(np.abs(a.weights)), rel=1e-5)
  # the box holds: the best weights inside (-0.2, 0.2) when the optimum lies outside it
  tight = jlora.multi.lorahub(task["loss"], task["adapters"], optimizer="cma", bounds=(-0.2, 0.2), budget=40)
  assert np.all(np.abs(tight.weights) <= 0.2) and np.isclose(np.abs(tight.weights).max(), 0.2)
  # any object with ask/tell
  rs = RandomSearch(np.random.default_rng(0))
  res = jlora.multi.lorahub(task["loss"], task["adapters"], optimizer=rs, budget=20)
  assert rs.told == 20 and res.objective == min(res.history)
  # it beats the base (w = 0, its first evaluation) and the uniform average
  uniform = float(task["loss"](jlora.compose(task["adapters"], [1 / N] * N, method="cat")))
  assert a.loss < float(task["loss"](task["params"])) and a.loss < uniform


def test_search_errors(task):
  with pytest.raises(ValueError, match="budget must be a positive integer"):
    jlora.multi.lorahub(task["loss"], task["adapters"], budget=0)
  with pytest.raises(ValueError, match="optimizer must be 'es', 'cma'"):
    jlora.multi.lorahub(task["loss"], task["adapters"], optimizer="nevergrad", budget=1)
  with pytest.raises(ValueError, match="method must be 'cat' or 'linear'"):
    jlora.multi.lorahub(task["loss"], task["adapters"], method="svd", budget=1)
  with pytest.raises(ValueError, match="init has 2 entries for 4 adapters"):
    jlora.multi.lorahub(task["loss"], task["adapters"], init=[0, 0], budget=1)
  with pytest.raises(ValueError, match="lower < upper"):
    jlora.multi.lorahub(task["loss"], task["adapters"], bounds=(1, -1), budget=1)
  es = jlora.multi.CMAES(3, seed=0)
  with pytest.raises(ValueError, match="was not asked"):
    es.tell(np.zeros(3), 1.0)
  with pytest.raises(ValueError, match="x0 has 2 entries; expected 3"):
    jlora.multi.OnePlusOneES(3, x0=[0, 0])


def test_cma_es_on_a_rotated_ellipsoid():
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
  scales = np.logspace(0, 2, 5)
  f = lambda x: float(np.sum((scales * (q @ (x - 0.3))) ** 2))
  es = jlora.multi.CMAES(5, sigma=0.3, seed=0)
  for _ in range(1500):
    x = es.ask()
    es.tell(x, f(x))
  # condition number 1e4 in a rotated frame: CMA-ES learns the covariance and converges
  assert f(es.recommend()) < 1e-8
  one = jlora.multi.OnePlusOneES(5, seed=0)
  for _ in range(600):
    x = one.ask()
    one.tell(x, float(np.sum((x - 0.3) ** 2)))
  assert np.sum((one.recommend() - 0.3) ** 2) < 1e-6
