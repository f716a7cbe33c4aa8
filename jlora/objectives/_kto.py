"""KTO (Ethayarajh et al. 2024): unpaired desirable/undesirable completions, with TRL's KL estimate."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jlora.objectives._common import Metrics, check_nonnegative, check_positive, check_same_shape, f32


def kto_loss(policy_logps: jax.Array, ref_logps: jax.Array, policy_kl_logps: jax.Array, ref_kl_logps: jax.Array,
             desirable: jax.Array, *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[jax.Array, Metrics]:
  """The KTO loss of a batch of labelled completions and TRL's metrics (``KTOTrainer._compute_loss``).

  With ``r = policy − ref`` (summed completion log-probs) and the KL estimate
  ``z0 = max(0, mean(policy_kl − ref_kl))`` (no gradient), each completion's loss is
  ``λ_D·(1 − σ(β(r − z0)))`` if desirable, ``λ_U·(1 − σ(β(z0 − r)))`` otherwise; the loss is
  their mean over the batch.

  The KL terms are the log-probs of *mismatched* pairs: TRL pairs prompt ``x_i`` with the
  completion ``y_{i−1}`` of the previous example within each block of
  ``per_device_train_batch_size`` examples (the first takes the block's last;
  ``kl_completions`` builds them), needs a block of at least 2, and computes the policy's KL
  log-probs without gradient (as here: ``z0`` is detached).

  Args:
    policy_logps: ``(N,)`` summed completion log-probs under the policy.
    ref_logps: ``(N,)`` the same under the reference model (no gradient flows).
    policy_kl_logps: ``(N,)`` summed log-probs of the mismatched completions under the policy.
    ref_kl_logps: ``(N,)`` the same under the reference model.
    desirable: ``(N,)`` bool, True for desirable (``label=True``) completions.
    beta: β.
    desirable_weight: λ_D.
    undesirable_weight: λ_U.

  Returns:
    ``(loss, metrics)``: TRL's ``kl`` (z0), ``rewards/chosen``, ``logps/chosen`` (sums over the
    desirable completions ÷ their count), ``rewards/rejected``, ``logps/rejected`` (the same
    for undesirable ones) and ``rewards/margins`` (their difference). A metric TRL does not log
    because its label is absent from the batch is NaN here (average them with ``nanmean``).

  Raises:
    ValueError: ``beta <= 0``, a negative weight, or inputs of different shapes.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.objectives import kto_loss
    >>> z = jnp.zeros(2)
    >>> loss, m = kto_loss(jnp.array([-1.0, -3.0]), jnp.array([-2.0, -2.0]), z, z, jnp.array([True, False]), beta=1.0)
    >>> round(float(loss), 4), float(m["rewards/margins"])  # both 1 − σ(1)
    (0.2689, 2.0)
  """
  fn = "kto_loss"
  beta = check_positive(fn, "beta", beta, why="the reward scale")
  w_d = check_nonnegative(fn, "desirable_weight", desirable_weight, why="λ_D")
  w_u = check_nonnegative(fn, "undesirable_weight", undesirable_weight, why="λ_U")
  check_same_shape(fn, policy_logps=policy_logps, ref_logps=ref_logps, policy_kl_logps=policy_kl_logps,
                   ref_kl_logps=ref_kl_logps, desirable=desirable)
  sg = jax.lax.stop_gradient
  pol = f32(policy_logps)
  r = pol - sg(f32(ref_logps))
  z0 = sg(jnp.maximum(jnp.mean(f32(policy_kl_logps) - f32(ref_kl_logps)), 0.0))
  good = jnp.asarray(desirable).astype(bool)
  losses = jnp.where(good, w_d * (1.0 - jax.nn.sigmoid(beta * (r - z0))),
                     w_u * (1.0 - jax.nn.sigmoid(beta * (z0 - r))))
  n_good = jnp.sum(good).astype(jnp.float32)
  n_bad = jnp.sum(~good).astype(jnp.float32)

  def mean_over(sel, x, n):
    return jnp.where(n > 0, jnp.sum(jnp.where(sel, sg(x), 0.0)) / jnp.maximum(n, 1.0), jnp.nan)

  rc, rr = mean_over(good, beta * r, n_good), mean_over(~good, beta * r, n_bad)
  metrics = {"kl": z0, "rewards/chosen": rc, "logps/chosen": mean_over(good, pol, n_good),
             "rewards/rejected": rr, "logps/rejected": mean_over(~good, pol, n_bad), "rewards/margins": rc - rr}
  return jnp.mean(losses), metrics


def kl_completions(completions: Sequence[Sequence[int]], *, batch_size: int) -> list[list[int]]:
  """TRL's mismatched completions for KTO's KL estimate: rotated by one within each block.

  Example ``i`` of a block gets the completion of example ``i − 1`` (the first gets the
  block's last), blocks of ``batch_size`` consecutive examples (the last may be shorter), as
  ``KTOTrainer`` does with ``per_device_train_batch_size`` before any shuffling. Pair each
  prompt ``x_i`` with the result's ``i``-th completion for the KL sequences.

  Args:
    completions: the completions' token ids, in dataset order.
    batch_size: examples per block (TRL's ``per_device_train_batch_size``), at least 2.

  Returns:
    The rotated completions (new lists).

  Raises:
    ValueError: ``batch_size < 2`` (a block of one pairs each prompt with its own completion).

  Example:
    >>> from jlora.objectives import kl_completions
    >>> kl_completions([[1], [2], [3], [4], [5]], batch_size=3)
    [[3], [1], [2], [5], [4]]
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
    raise ValueError(f"kl_completions: batch_size must be an int >= 2 (with 1, each prompt would be paired with its "
                     f"own completion and the KL estimate would be the rewards' mean), got {batch_size!r}.")
  out: list[list[int]] = []
  for start in range(0, len(completions), batch_size):
    block = [list(c) for c in completions[start:start + batch_size]]
    out.extend(block[-1:] + block[:-1])
  return out
