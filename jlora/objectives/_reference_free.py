"""Reference-free preference losses: SimPO (TRL's CPO with ``loss_type="simpo"``) and ORPO."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.objectives._common import (Metrics, check_nonnegative, check_positive, check_same_shape, f32,
                                      reward_metrics)


def _mean(logps, counts):
  return f32(logps) / jnp.maximum(f32(counts), 1.0)


def _nll(logps, counts):
  """Token-mean negative log-likelihood of a batch: ``−Σ logps / Σ counts``."""
  return -jnp.sum(f32(logps)) / jnp.maximum(jnp.sum(f32(counts)), 1.0)


def _check_smoothing(fn: str, label_smoothing) -> float:
  if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
      or not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"{fn}: label_smoothing must be in [0, 0.5) (the assumed share of flipped labels), got "
                     f"{label_smoothing!r}.")
  return float(label_smoothing)


def simpo_loss(chosen_logps: jax.Array, rejected_logps: jax.Array, chosen_counts: jax.Array,
               rejected_counts: jax.Array, *, beta: float = 0.1, gamma: float = 0.5, label_smoothing: float = 0.0,
               cpo_alpha: float = 0.0) -> tuple[jax.Array, Metrics]:
  """SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin γ.

  TRL's ``CPOTrainer`` with ``loss_type="simpo"``: with ``ā`` the mean completion log-prob
  (``logps / counts``) and ``z = ā_chosen − ā_rejected − γ/β``, per pair
  ``−(1−ε)·log σ(βz) − ε·log σ(−βz)``; the loss is their mean plus ``cpo_alpha`` times the
  token-mean NLL of the chosen completions (``−Σ chosen_logps / Σ chosen_counts``).

  ``cpo_alpha`` defaults to 0: pure SimPO. TRL's ``CPOConfig`` defaults to 1.0 (CPO's
  behaviour-cloning term); pass ``cpo_alpha=1.0`` for that. ``beta`` and ``gamma`` default to
  ``CPOConfig``'s 0.1 and 0.5; TRL's documented SimPO recipe is β = 2.5, γ = 1.375.

  Args:
    chosen_logps: ``(B,)`` summed completion log-probs of the chosen responses.
    rejected_logps: ``(B,)`` the same for the rejected responses.
    chosen_counts: ``(B,)`` completion tokens scored in ``chosen_logps`` (0 counts as 1).
    rejected_counts: ``(B,)`` the same for the rejected responses.
    beta: β, the reward scale.
    gamma: γ, the target reward margin.
    label_smoothing: ε in ``[0, 0.5)``.
    cpo_alpha: weight of the chosen completions' NLL (0: pure SimPO).

  Returns:
    ``(loss, metrics)``: TRL's ``rewards/*`` (``β·ā``), ``logps/chosen``/``logps/rejected``
    (the batch means of ``ā``, as TRL logs them for SimPO) and ``nll_loss`` (0 when
    ``cpo_alpha`` is 0, as TRL does not compute it then).

  Raises:
    ValueError: ``beta <= 0``, ``gamma < 0``, ``cpo_alpha < 0``, ``label_smoothing`` outside
      ``[0, 0.5)``, or inputs of different shapes.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.objectives import simpo_loss
    >>> loss, m = simpo_loss(jnp.array([-2.0]), jnp.array([-6.0]), jnp.array([2]), jnp.array([3]), beta=2.0, gamma=1.0)
    >>> round(float(loss), 4), float(m["logps/chosen"])  # −log σ(2·(−1 + 2) − 1)
    (0.3133, -1.0)
  """
  fn = "simpo_loss"
  beta = check_positive(fn, "beta", beta, why="the reward scale")
  gamma = check_nonnegative(fn, "gamma", gamma, why="the target reward margin")
  cpo_alpha = check_nonnegative(fn, "cpo_alpha", cpo_alpha, why="the weight of the chosen NLL term; 0 is pure SimPO")
  eps = _check_smoothing(fn, label_smoothing)
  check_same_shape(fn, chosen_logps=chosen_logps, rejected_logps=rejected_logps, chosen_counts=chosen_counts,
                   rejected_counts=rejected_counts)
  a_c, a_r = _mean(chosen_logps, chosen_counts), _mean(rejected_logps, rejected_counts)
  z = beta * (a_c - a_r - gamma / beta)
  losses = -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
  nll = _nll(chosen_logps, chosen_counts) if cpo_alpha != 0.0 else jnp.zeros((), jnp.float32)
  loss = jnp.mean(losses) + cpo_alpha * nll
  metrics = reward_metrics(beta * a_c, beta * a_r, a_c, a_r)
  metrics["nll_loss"] = jax.lax.stop_gradient(nll)
  return loss, metrics


def _log1mexp(x):
  """``log(1 − eˣ)`` for ``x < 0``, switching form at ``−log 2`` to avoid cancellation."""
  return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo_loss(chosen_logps: jax.Array, rejected_logps: jax.Array, chosen_counts: jax.Array,
              rejected_counts: jax.Array, *, nll_logps: jax.Array, nll_counts: jax.Array, beta: float = 0.1
              ) -> tuple[jax.Array, Metrics]:
  """ORPO (Hong et al. 2024): NLL plus λ times the odds-ratio term, reference-free.

  TRL's ``ORPOTrainer``: with ``ā`` the mean completion log-prob, ``log_odds = (ā_c − ā_r) −
  [log(1 − e^ā_c) − log(1 − e^ā_r)]`` and the loss ``NLL − β·mean(log σ(log_odds))``, where
  the NLL is the token mean over the chosen sequences' **prompt and completion** (every
  non-padding token after the first), passed as ``nll_logps``/``nll_counts``.

  Args:
    chosen_logps: ``(B,)`` summed completion log-probs of the chosen responses.
    rejected_logps: ``(B,)`` the same for the rejected responses.
    chosen_counts: ``(B,)`` completion tokens scored in ``chosen_logps`` (0 counts as 1).
    rejected_counts: ``(B,)`` the same for the rejected responses.
    nll_logps: ``(B,)`` summed log-probs of each chosen sequence over all its real tokens
      (``preference_logps(..., nll=True)``).
    nll_counts: ``(B,)`` the tokens scored in ``nll_logps``.
    beta: λ, the weight of the odds-ratio term (TRL calls it ``beta``).

  Returns:
    ``(loss, metrics)``: TRL's ``rewards/*`` (``β·ā``), ``logps/*`` (means of ``ā``),
    ``nll_loss``, ``log_odds_ratio`` (mean ``log σ(log_odds)``) and ``log_odds_chosen`` (mean
    ``log_odds``).

  Raises:
    ValueError: ``beta <= 0`` or inputs of different shapes.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.objectives import orpo_loss
    >>> loss, m = orpo_loss(jnp.array([-1.0]), jnp.array([-2.0]), jnp.array([1]), jnp.array([1]),
    ...                     nll_logps=jnp.array([-3.0]), nll_counts=jnp.array([3]))
    >>> round(float(m["log_odds_chosen"]), 4), round(float(loss), 4)
    (1.3133, 1.0238)
  """
  fn = "orpo_loss"
  beta = check_positive(fn, "beta", beta, why="λ, the weight of the odds-ratio term")
  check_same_shape(fn, chosen_logps=chosen_logps, rejected_logps=rejected_logps, chosen_counts=chosen_counts,
                   rejected_counts=rejected_counts, nll_logps=nll_logps, nll_counts=nll_counts)
  a_c, a_r = _mean(chosen_logps, chosen_counts), _mean(rejected_logps, rejected_counts)
  log_odds = (a_c - a_r) - (_log1mexp(a_c) - _log1mexp(a_r))
  ratio = jax.nn.log_sigmoid(log_odds)
  nll = _nll(nll_logps, nll_counts)
  loss = nll - beta * jnp.mean(ratio)
  metrics = reward_metrics(beta * a_c, beta * a_r, a_c, a_r)
  metrics.update({"nll_loss": jax.lax.stop_gradient(nll), "log_odds_ratio": jax.lax.stop_gradient(jnp.mean(ratio)),
                  "log_odds_chosen": jax.lax.stop_gradient(jnp.mean(log_odds))})
  return loss, metrics
