"""LoRAHub: the composition weights that fit a few examples of a new task.

Huang et al. (2023) compose ``n`` adapters with weights ``w`` and search ``w``
to minimise ``few-shot loss + λ·mean|w|`` without gradients. Here the
composition is ``jlora.compose`` (``method="cat"`` by default: the exact
``Σ w_i ΔW_i``, linear in ``w``; the paper's element-wise sum of the factors
is ``method="linear"``-like, with cross terms), the objective is jitted once
with ``w`` as an argument, and the search is a seeded, bounded ask/tell
minimiser (``OnePlusOneES``, ``CMAES``, or any object with ``ask``/``tell``)
or, since the objective is differentiable in ``w``, an optax optimizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora.multi._compose import compose
from jlora.multi._search import CMAES, OnePlusOneES

Params = Any


@dataclasses.dataclass(frozen=True)
class LoraHubResult:
  """The outcome of ``lorahub``."""

  # The composed adapter (a plain LoRA tree on the base) at the best weights.
  params: Params
  # The best weights found, one per adapter.
  weights: np.ndarray
  # Objective at the best weights: few-shot loss + l1·mean|w|.
  objective: float
  # The few-shot loss alone at the best weights.
  loss: float
  # Objective value of every evaluation (or optimizer step), in order.
  history: list[float]


def lorahub(loss_fn: Callable[[Params], jax.Array], adapters: Sequence[Params], *, budget: int = 40,
            optimizer: str | Any = "es", l1: float = 0.05, bounds: tuple[float, float] = (-1.5, 1.5),
            init: Sequence[float] | None = None, method: str = "cat", sigma: float | None = None,
            seed: int = 0) -> LoraHubResult:
  """Finds composition weights for ``adapters`` that minimise ``loss_fn`` + ``l1``·mean|w|.

  Args:
    loss_fn: the few-shot loss of a LoRA tree, e.g.
      ``lambda p: ce(jlora.wrap(forward)(p, ids), labels)``; it is jitted with
      the composed tree as its argument.
    adapters: LoRA trees on the same base.
    budget: evaluations (gradient-free) or optimizer steps (optax).
    optimizer: ``"es"`` ((1+1)-ES with the 1/5 rule), ``"cma"`` (CMA-ES), any
      object with ``ask() -> w`` and ``tell(w, value)``, or an
      ``optax.GradientTransformation`` (gradient steps on ``w``, projected into
      ``bounds``).
    l1: weight of the ``mean|w|`` penalty (the paper's 0.05).
    bounds: the box the weights stay in (the paper's ±1.5).
    init: starting weights (default: zeros, the base model, as in the paper).
    method: ``jlora.compose`` method: ``"cat"`` (exact ``Σ w_i ΔW_i``) or ``"linear"``.
    sigma: initial step of the built-in searches (default 0.3 for ``"es"``, 0.2 for ``"cma"``).
    seed: seeds the built-in searches.

  Returns:
    A ``LoraHubResult`` with the composed adapter at the best weights.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, jlora.multi
    >>> p = {"w": jnp.eye(4)}
    >>> mk = lambda k: jlora.init(jax.random.key(k), p, jlora.LoraConfig(rank=2, targets="w", init="gaussian"))
    >>> ads = [jax.tree.map(lambda w: w.replace(b=jnp.ones_like(w.b)) if isinstance(w, jlora.LoraWeight) else w,
    ...        mk(k), is_leaf=lambda w: isinstance(w, jlora.LoraWeight)) for k in (0, 1)]
    >>> x = jnp.ones((3, 4))
    >>> loss = lambda tree: jnp.mean((jlora.wrap(lambda p, x: x @ p["w"])(tree, x) - 2.0) ** 2)
    >>> res = jlora.multi.lorahub(loss, ads, budget=30)
    >>> res.weights.shape, res.loss < float(loss(p))
    ((2,), True)
  """
  adapters = list(adapters)
  n = len(adapters)
  if n < 1:
    raise ValueError("jlora.multi.lorahub: give at least one adapter tree.")
  if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
    raise ValueError(f"jlora.multi.lorahub: budget must be a positive integer, got {budget!r}.")
  lower, upper = (float(b) for b in bounds)
  if not lower < upper:
    raise ValueError(f"jlora.multi.lorahub: bounds must be (lower, upper) with lower < upper, got {bounds!r}.")
  if method not in ("cat", "linear"):
    raise ValueError(f"jlora.multi.lorahub: method must be 'cat' or 'linear' (differentiable in the weights), "
                     f"got {method!r}.")
  if not l1 >= 0:
    raise ValueError(f"jlora.multi.lorahub: l1 must be >= 0, got {l1!r}.")
  x0 = np.zeros(n) if init is None else np.asarray(init, np.float64)
  if x0.shape != (n,):
    raise ValueError(f"jlora.multi.lorahub: init has {x0.size} entries for {n} adapters.")

  def few_shot(w):
    return loss_fn(compose(adapters, w, method=method))

  def objective(w):
    loss = few_shot(w)
    return loss + l1 * jnp.mean(jnp.abs(w)), loss

  history: list[float] = []
  best = (np.inf, np.inf, x0)
  if isinstance(optimizer, optax.GradientTransformation):
    step = jax.jit(jax.value_and_grad(objective, has_aux=True))
    w = jnp.clip(jnp.asarray(x0, jnp.float32), lower, upper)
    state = optimizer.init(w)
    for _ in range(int(budget)):
      (value, loss), grad = step(w)
      value, loss = float(value), float(loss)
      history.append(value)
      if value < best[0]:
        best = (value, loss, np.asarray(w, np.float64))
      updates, state = optimizer.update(grad, state, w)
      w = jnp.clip(optax.apply_updates(w, updates), lower, upper)
  else:
    if optimizer == "es":
      search = OnePlusOneES(n, lower=lower, upper=upper, sigma=0.3 if sigma is None else sigma, x0=x0, seed=seed)
    elif optimizer == "cma":
      search = CMAES(n, lower=lower, upper=upper, sigma=0.2 if sigma is None else sigma, x0=x0, seed=seed)
    elif hasattr(optimizer, "ask") and hasattr(optimizer, "tell"):
      search = optimizer
    else:
      raise ValueError(f"jlora.multi.lorahub: optimizer must be 'es', 'cma', an object with ask()/tell(x, value) or "
                       f"an optax.GradientTransformation, got {optimizer!r}.")
    evaluate = jax.jit(objective)
    for _ in range(int(budget)):
      x = np.asarray(search.ask(), np.float64).reshape(-1)
      if x.shape != (n,):
        raise ValueError(f"jlora.multi.lorahub: the optimizer asked for {x.size} weights; there are {n} adapters.")
      value, loss = (float(v) for v in evaluate(jnp.asarray(x, jnp.float32)))
      search.tell(x, value)
      history.append(value)
      if value < best[0]:
        best = (value, loss, x)
  value, loss, w = best
  return LoraHubResult(params=compose(adapters, jnp.asarray(w, jnp.float32), method=method),
                       weights=np.asarray(w), objective=value, loss=loss, history=history)
