"""GRPO (Shao et al. 2024) and its variants with TRL 1.16's ``GRPOTrainer`` formulas and metric names.

Two pure functions of arrays, usable from any loop:

* ``grpo_advantages``: each completion's reward against its group's (the ``G`` completions of
  one prompt), TRL's ``sum_then_normalize`` with ``scale_rewards`` ``group``, ``batch`` or ``none``;
  ``grpo_reward_metrics``: TRL's reward metrics of a rollout batch.
* ``grpo_loss_terms`` / ``grpo_loss``: the clipped per-token objective with the token- or
  sequence-level (GSPO) importance ratio, the k3 KL to a reference times that ratio, and TRL's
  aggregation for ``grpo``, ``bnpo``, ``dr_grpo`` and ``dapo``.

``grpo_loss_terms`` returns ``(total, count, metrics)`` so that several micro-batches of one
generation batch aggregate exactly as TRL's gradient accumulation does: the loss of the
optimizer step is ``Σ total / Σ count`` over its micro-batches. With ``M`` micro-batches
(TRL's ``gradient_accumulation_steps``, one generation per optimizer step):

==========  =====================================  ===============================  ======================
loss_type   TRL, per micro-batch                   total                            count
==========  =====================================  ===============================  ======================
grpo        mean_i(Σ_t ℓm / Σ_t m) / M             Σ_i Σ_t ℓm / Σ_t m               rows (with a token)
bnpo        Σℓm / Σm / M                           Σℓm / Σm                         1 (0 if no token)
dr_grpo     Σℓm / (rows · L) / M                   Σℓm / L                          rows (with a token)
dapo        Σℓm / (N / P · M / S), S = M           Σℓm                              Σm
==========  =====================================  ===============================  ======================

(``L`` the longest completion allowed, ``N`` the active tokens of the whole generation
batch over all ``P`` processes; ``Σ_m Σm = N``, so dapo's ``Σ total / Σ count`` is TRL's
``Σℓm / N`` exactly.) Rows with no active token (a dropped group, padding) count nothing;
TRL's rows always hold at least one token, so its counts are the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora.objectives._common import Metrics, check_choice, check_nonnegative, check_positive, f32

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
_STD_EPS = 1e-4  # TRL's: A / (std + 1e-4)


def _std(x: jax.Array, axis=None) -> jax.Array:
  """Standard deviation with Bessel's correction (n − 1), as ``torch.std`` and TRL's ``nanstd``."""
  return jnp.std(x, axis=axis, ddof=1)


def grpo_advantages(rewards: jax.typing.ArrayLike, *, num_generations: int, scale_rewards: str = "group"
                    ) -> jax.Array:
  """Group-relative advantages: each reward minus its group's mean, optionally over a std.

  ``rewards`` holds the ``G = num_generations`` completions of each prompt consecutively
  (prompt 0's G rewards, then prompt 1's, ...), the combined reward ``Σ_k w_k·R_k`` of TRL's
  default ``multi_objective_aggregation="sum_then_normalize"``. ``A = R − mean_group(R)``, then
  divided by ``std + 1e-4`` where ``std`` (Bessel-corrected) is the group's (``"group"``) or
  the whole batch's (``"batch"``); ``"none"`` does not divide (Dr. GRPO). A group whose rewards
  are all equal gets ``A = 0``.

  Args:
    rewards: ``(N,)`` rewards, ``N`` a multiple of ``num_generations``.
    num_generations: completions per prompt ``G`` (at least 2).
    scale_rewards: ``"group"`` (TRL's default), ``"batch"`` or ``"none"``.

  Returns:
    float32 ``(N,)``.

  Raises:
    ValueError: a bad ``scale_rewards`` or ``num_generations``, or ``N`` not a multiple of it.

  Example:
    >>> from jlora.objectives import grpo_advantages
    >>> [round(float(a), 3) for a in grpo_advantages([1.0, 0.0, 1.0, 1.0], num_generations=2)]
    [0.707, -0.707, 0.0, 0.0]
    >>> grpo_advantages([1.0, 0.0, 1.0, 1.0], num_generations=2, scale_rewards="none").tolist()
    [0.5, -0.5, 0.0, 0.0]
  """
  fn = "grpo_advantages"
  check_choice(fn, "scale_rewards", scale_rewards, SCALE_REWARDS)
  if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 2:
    raise ValueError(f"{fn}: num_generations must be an integer >= 2 (the completions of one prompt form a "
                     f"group), got {num_generations!r}.")
  r = f32(rewards)
  if r.ndim != 1 or r.shape[0] % num_generations:
    raise ValueError(f"{fn}: rewards must be (N,) with N a multiple of num_generations={num_generations} (each "
                     f"prompt's completions consecutively), got shape {r.shape}.")
  groups = r.reshape(-1, num_generations)
  advantages = (groups - jnp.mean(groups, axis=1, keepdims=True)).reshape(-1)
  if scale_rewards == "group":
    advantages = advantages / (jnp.repeat(_std(groups, axis=1), num_generations) + _STD_EPS)
  elif scale_rewards == "batch":
    advantages = advantages / (_std(r) + _STD_EPS)
  return advantages


def grpo_reward_metrics(rewards: jax.typing.ArrayLike, *, num_generations: int, names: Sequence[str],
                        weights: Sequence[float] | None = None, scale_rewards: str = "group") -> dict[str, float]:
  """TRL's reward metrics of a rollout batch: ``reward``, ``reward_std``, ``frac_reward_zero_std`` and each
  function's ``rewards/<name>/mean`` and ``rewards/<name>/std``.

  ``reward`` is the mean of the combined reward ``Σ_k w_k·R_k`` (what ``grpo_advantages`` takes),
  the standard deviations are Bessel-corrected, and ``frac_reward_zero_std`` is the share of
  completions whose group (``scale_rewards="batch"``: whose batch) has rewards all equal.

  Args:
    rewards: ``(N, K)``: each completion's reward from each of ``K`` functions.
    num_generations: completions per prompt (consecutive rows).
    names: the ``K`` functions' names.
    weights: the ``K`` weights (default: ones).
    scale_rewards: as ``grpo_advantages`` (which standard deviation ``frac_reward_zero_std`` tests).

  Returns:
    Python floats by name.

  Example:
    >>> from jlora.objectives import grpo_reward_metrics
    >>> m = grpo_reward_metrics([[1.0], [0.0], [1.0], [1.0]], num_generations=2, names=["exact_match"])
    >>> m["reward"], m["frac_reward_zero_std"], m["rewards/exact_match/mean"]
    (0.75, 0.5, 0.75)
  """
  r = np.asarray(rewards, np.float64)
  if r.ndim != 2 or r.shape[1] != len(names):
    raise ValueError(f"grpo_reward_metrics: rewards must be (completions, {len(names)}) for the names {list(names)}, "
                     f"got shape {r.shape}.")
  w = np.ones(r.shape[1]) if weights is None else np.asarray(weights, np.float64)
  std = lambda x: float(np.std(x, ddof=1)) if x.size > 1 else 0.0  # noqa: E731
  total = r @ w
  out = {}
  for k, name in enumerate(names):
    out[f"rewards/{name}/mean"] = float(np.mean(r[:, k]))
    out[f"rewards/{name}/std"] = std(r[:, k])
  out["reward"] = float(np.mean(total))
  out["reward_std"] = std(total)
  if scale_rewards == "batch":
    zero = np.full(total.shape, abs(std(total)) <= 1e-8)
  else:
    zero = np.repeat(np.std(total.reshape(-1, num_generations), axis=1, ddof=1) <= 1e-8, num_generations)
  out["frac_reward_zero_std"] = float(np.mean(zero))
  return out


def _check_2d(fn: str, **arrays) -> tuple[int, int]:
  shapes = {k: jnp.shape(v) for k, v in arrays.items() if v is not None}
  first = next(iter(shapes.values()))
  if len(first) != 2 or any(s != first for s in shapes.values()):
    listed = ", ".join(f"{k} {s}" for k, s in shapes.items())
    raise ValueError(f"{fn}: the per-token arrays must all be (rows, positions) of one shape; got {listed}.")
  return first


def grpo_loss_terms(logps: jax.Array, advantages: jax.Array, mask: jax.Array, *, old_logps: jax.Array | None = None,
                    ref_logps: jax.Array | None = None, loss_type: str = "dapo", epsilon: float = 0.2,
                    epsilon_high: float | None = None, beta: float = 0.0, importance_sampling_level: str = "token",
                    max_completion_length: int | None = None) -> tuple[jax.Array, jax.Array, Metrics]:
  """One micro-batch's share of the GRPO loss: ``(total, count, metrics)``, the loss being ``Σ total / Σ count``.

  Per token (TRL's ``_compute_loss``): ``log ρ = logps − old_logps`` (``"token"``), or its
  masked mean over each sequence (``"sequence"``, GSPO); ``ℓ = −min(ρA, clip(ρ, 1−ε, 1+ε_high)·A)``;
  with ``beta > 0``, ``ℓ += β·ρ·(e^(ref−logps) − (ref−logps) − 1)`` (the k3 estimator of the KL
  to the reference, times ρ not detached: TRL 1.16's ``use_bias_correction_kl=True``). The
  module docstring gives each ``loss_type``'s ``total`` and ``count``.

  Args:
    logps: ``(B, T)`` the policy's token log-probs (differentiated; ``model_token_logprobs``
      with the sampling temperature), any value where ``mask`` is 0.
    advantages: ``(B,)`` from ``grpo_advantages``.
    mask: ``(B, T)`` the completion tokens that count (aligned with ``logps``).
    old_logps: ``(B, T)`` the log-probs of the policy that sampled the completions; None:
      ``stop_gradient(logps)`` (ratio 1: one optimizer step per generation, TRL's
      ``num_iterations=1``).
    ref_logps: ``(B, T)`` the reference's (required when ``beta > 0``).
    loss_type: ``"grpo"``, ``"bnpo"``, ``"dr_grpo"`` or ``"dapo"`` (TRL's default).
    epsilon: ε, the lower clipping range (and the upper one unless ``epsilon_high``).
    epsilon_high: the upper clipping range (DAPO's clip-higher); None: ``epsilon``.
    beta: weight of the KL to the reference (TRL's default 0).
    importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO).
    max_completion_length: ``L``, dr_grpo's constant normaliser (required for it).

  Returns:
    ``(total, count, metrics)``: float32 scalars and TRL's metrics of the micro-batch:
    ``kl`` (``beta > 0`` only), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
    ``clip_ratio/region_mean``, ``clip_ratio/low_min``, ``clip_ratio/high_max``.

  Raises:
    ValueError: a bad option, a missing ``ref_logps`` or ``max_completion_length``, or
      mismatched shapes.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.objectives import grpo_loss_terms
    >>> logps = jnp.log(jnp.array([[0.5, 0.5, 1.0], [0.25, 1.0, 1.0]]))
    >>> mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    >>> total, count, m = grpo_loss_terms(logps, jnp.array([1.0, -1.0]), mask)
    >>> float(total), float(count)  # dapo: −Σ A over the three tokens, and their count
    (-1.0, 3.0)
  """
  fn = "grpo_loss_terms"
  check_choice(fn, "loss_type", loss_type, GRPO_LOSS_TYPES)
  check_choice(fn, "importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
  eps_low = check_positive(fn, "epsilon", epsilon, why="the clipping range")
  eps_high = eps_low if epsilon_high is None else check_positive(fn, "epsilon_high", epsilon_high,
                                                                 why="the upper clipping range")
  beta = check_nonnegative(fn, "beta", beta, why="the KL weight")
  if beta > 0 and ref_logps is None:
    raise ValueError(f"{fn}: beta={beta} weighs a KL to the reference: pass ref_logps (e.g. model_token_logprobs(..., "
                     "reference=True)), or beta=0.")
  if loss_type == "dr_grpo":
    if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int) or \
        max_completion_length < 1:
      raise ValueError(f"{fn}: loss_type='dr_grpo' divides by rows × max_completion_length: pass "
                       f"max_completion_length (the longest completion the rollout allows), got "
                       f"{max_completion_length!r}.")
  rows, _ = _check_2d(fn, logps=logps, mask=mask, old_logps=old_logps, ref_logps=ref_logps)
  if jnp.shape(advantages) != (rows,):
    raise ValueError(f"{fn}: advantages must be (rows,) = ({rows},), one per completion; got {jnp.shape(advantages)}.")

  logps = f32(logps)
  m = jnp.asarray(mask).astype(jnp.float32)
  adv = jax.lax.stop_gradient(f32(advantages))[:, None]
  old = jax.lax.stop_gradient(logps) if old_logps is None else jax.lax.stop_gradient(f32(old_logps))
  tokens = jnp.sum(m, axis=1)
  log_ratio = jnp.where(m > 0, logps - old, 0.0)
  if importance_sampling_level == "token":
    log_weights = log_ratio
  else:
    log_weights = (jnp.sum(log_ratio * m, axis=1) / jnp.maximum(tokens, 1.0))[:, None]
  coef_1 = jnp.exp(log_weights)
  coef_2 = jnp.clip(coef_1, 1.0 - eps_low, 1.0 + eps_high)
  per_token = -jnp.minimum(coef_1 * adv, coef_2 * adv)
  metrics: Metrics = {}
  if beta > 0:
    diff = jnp.where(m > 0, jax.lax.stop_gradient(f32(ref_logps)) - logps, 0.0)
    kl = (jnp.exp(diff) - diff - 1.0) * coef_1
    per_token = per_token + beta * kl
    metrics["kl"] = _masked_mean(kl, m)
  per_token = jnp.broadcast_to(per_token, m.shape)

  summed = jnp.sum(per_token * m, axis=1)
  has_tokens = (tokens > 0).astype(jnp.float32)
  if loss_type == "grpo":
    total, count = jnp.sum(summed / jnp.maximum(tokens, 1.0)), jnp.sum(has_tokens)
  elif loss_type == "bnpo":
    n = jnp.sum(tokens)
    total, count = jnp.sum(summed) / jnp.maximum(n, 1.0), (n > 0).astype(jnp.float32)
  elif loss_type == "dr_grpo":
    total, count = jnp.sum(summed) / max_completion_length, jnp.sum(has_tokens)
  else:  # dapo
    total, count = jnp.sum(summed), jnp.sum(tokens)

  low = ((coef_1 < 1.0 - eps_low) & (adv < 0)).astype(jnp.float32)
  high = ((coef_1 > 1.0 + eps_high) & (adv > 0)).astype(jnp.float32)
  region = jnp.maximum(low, high)
  metrics["clip_ratio/low_mean"] = _masked_mean(low, m)
  metrics["clip_ratio/high_mean"] = _masked_mean(high, m)
  metrics["clip_ratio/region_mean"] = _masked_mean(region, m)
  metrics["clip_ratio/low_min"] = jnp.nanmin(_per_sequence(low, m))
  metrics["clip_ratio/high_max"] = jnp.nanmax(_per_sequence(high, m))
  return total, count, jax.tree.map(jax.lax.stop_gradient, metrics)


def _masked_mean(x: jax.Array, m: jax.Array) -> jax.Array:
  """TRL's ``global_masked_mean`` (one process): over the masked tokens, or over the rows of a ``(B, 1)`` value."""
  if x.shape[1] == 1:
    return jnp.mean(x)
  return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def _per_sequence(x: jax.Array, m: jax.Array) -> jax.Array:
  """TRL's ``masked_seq_mean``: each row's mean over its tokens (NaN for a row without any)."""
  if x.shape[1] == 1:
    return x[:, 0]
  n = jnp.sum(m, axis=1)
  return jnp.where(n > 0, jnp.sum(x * m, axis=1) / jnp.maximum(n, 1.0), jnp.nan)


def grpo_loss(logps: jax.Array, advantages: jax.Array, mask: jax.Array, *, old_logps: jax.Array | None = None,
              ref_logps: jax.Array | None = None, loss_type: str = "dapo", epsilon: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.0, importance_sampling_level: str = "token",
              max_completion_length: int | None = None, num_items_in_batch: jax.typing.ArrayLike | None = None
              ) -> tuple[jax.Array, Metrics]:
  """The GRPO loss of one batch, as TRL computes it for one micro-batch per optimizer step on one process.

  ``grpo_loss_terms``' ``total / count``, except that dapo divides by ``num_items_in_batch``
  when given (TRL: the active tokens of the whole generation batch, when this batch is a part
  of it). For several micro-batches, sum ``grpo_loss_terms``' totals and counts instead.

  Args:
    logps, advantages, mask, old_logps, ref_logps, loss_type, epsilon, epsilon_high, beta,
      importance_sampling_level, max_completion_length: as ``grpo_loss_terms``.
    num_items_in_batch: dapo's normaliser (default: this batch's active tokens).

  Returns:
    ``(loss, metrics)``: the scalar loss and ``grpo_loss_terms``' metrics.

  Raises:
    ValueError: as ``grpo_loss_terms``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.objectives import grpo_loss
    >>> logps = jnp.log(jnp.array([[0.5, 0.5, 1.0], [0.25, 1.0, 1.0]]))
    >>> mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    >>> loss, m = grpo_loss(logps, jnp.array([1.0, -1.0]), mask, loss_type="grpo")
    >>> float(loss), float(m["clip_ratio/region_mean"])  # mean over rows of −A: (−1 + 1) / 2
    (0.0, 0.0)
  """
  total, count, metrics = grpo_loss_terms(logps, advantages, mask, old_logps=old_logps, ref_logps=ref_logps,
                                          loss_type=loss_type, epsilon=epsilon, epsilon_high=epsilon_high,
                                          beta=beta, importance_sampling_level=importance_sampling_level,
                                          max_completion_length=max_completion_length)
  if loss_type == "dapo" and num_items_in_batch is not None:
    count = f32(num_items_in_batch)
  return total / jnp.maximum(count, 1.0), metrics
