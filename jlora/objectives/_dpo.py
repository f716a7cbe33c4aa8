"""DPO (Rafailov et al. 2023) with TRL 1.16's ``sigmoid``, ``ipo``, ``hinge`` and ``robust`` losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.objectives._common import Metrics, check_choice, check_positive, check_same_shape, f32, reward_metrics

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array,
             *, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_counts: jax.Array | None = None, rejected_counts: jax.Array | None = None
             ) -> tuple[jax.Array, Metrics]:
  """The DPO loss of a batch of pairs and TRL's metrics (``DPOTrainer._compute_loss``).

  With ``r = policy − ref`` (summed completion log-probs) and ``Δ = r_chosen − r_rejected``,
  per pair:

  * ``sigmoid``: ``−log σ(βΔ)`` (TRL 1.16 applies no label smoothing here);
  * ``hinge``: ``max(0, 1 − βΔ)``;
  * ``ipo``: ``(r_chosen/n_chosen − r_rejected/n_rejected − 1/(2β))²``, the length-normalised
    form TRL uses, ``n`` the completion token counts (at least 1);
  * ``robust``: ``[−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1 − 2ε)``, ``ε = label_smoothing``.

  The loss is the mean over the pairs.

  Args:
    policy_chosen: ``(B,)`` summed completion log-probs of the chosen responses (policy).
    policy_rejected: ``(B,)`` the same for the rejected responses.
    ref_chosen: ``(B,)`` the reference model's, for the chosen responses (no gradient flows).
    ref_rejected: ``(B,)`` the reference model's, for the rejected responses.
    beta: β, the strength of the implicit KL constraint (τ in IPO).
    loss_type: ``"sigmoid"``, ``"ipo"``, ``"hinge"`` or ``"robust"``.
    label_smoothing: ε in ``[0, 0.5)``, the assumed share of flipped labels (``robust`` only).
    chosen_counts: ``(B,)`` completion token counts of the chosen responses (``ipo`` only).
      TRL 1.16 counts the unshifted completion mask; ``preference_logps`` counts the scored
      tokens; the two differ only for a sequence that starts inside its completion.
    rejected_counts: ``(B,)`` the same for the rejected responses (``ipo`` only).

  Returns:
    ``(loss, metrics)``: the scalar loss and TRL's ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins`` (rewards ``β·r``), ``logps/chosen`` and
    ``logps/rejected`` (the policy's summed log-probs), batch means.

  Raises:
    ValueError: an unknown ``loss_type``, ``beta <= 0``, ``label_smoothing`` outside
      ``[0, 0.5)`` or set for a loss that does not use it, ``ipo`` without counts, or
      inputs of different shapes.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.objectives import dpo_loss
    >>> loss, m = dpo_loss(jnp.array([-4.0]), jnp.array([-6.0]), jnp.array([-5.0]), jnp.array([-5.0]), beta=0.5)
    >>> round(float(loss), 4), float(m["rewards/margins"])  # −log σ(0.5·2)
    (0.3133, 1.0)
  """
  fn = "dpo_loss"
  check_choice(fn, "loss_type", loss_type, DPO_LOSS_TYPES)
  beta = check_positive(fn, "beta", beta, why="the KL constraint's strength")
  if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
    raise ValueError(f"{fn}: label_smoothing must be a number in [0, 0.5), got {label_smoothing!r}.")
  if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"{fn}: label_smoothing must be in [0, 0.5) for loss_type='robust' (the share of flipped "
                     f"labels; the loss divides by 1 − 2ε), got {label_smoothing}.")
  if loss_type != "robust" and label_smoothing != 0.0:
    raise ValueError(f"{fn}: label_smoothing={label_smoothing} has no effect with loss_type={loss_type!r} (TRL 1.16 "
                     "smooths only 'robust'); use loss_type='robust' or label_smoothing=0.")
  if loss_type == "ipo" and (chosen_counts is None or rejected_counts is None):
    raise ValueError(f"{fn}: loss_type='ipo' normalises by completion length: pass chosen_counts and "
                     "rejected_counts (the completion token counts, e.g. preference_logps(...).chosen_counts).")
  check_same_shape(fn, policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                   ref_rejected=ref_rejected,
                   **({"chosen_counts": chosen_counts, "rejected_counts": rejected_counts} if loss_type == "ipo" else {}))
  pc, pr = f32(policy_chosen), f32(policy_rejected)
  r_c = pc - jax.lax.stop_gradient(f32(ref_chosen))
  r_r = pr - jax.lax.stop_gradient(f32(ref_rejected))
  z = beta * (r_c - r_r)
  if loss_type == "sigmoid":
    losses = -jax.nn.log_sigmoid(z)
  elif loss_type == "hinge":
    losses = jax.nn.relu(1.0 - z)
  elif loss_type == "ipo":
    n_c = jnp.maximum(f32(chosen_counts), 1.0)
    n_r = jnp.maximum(f32(rejected_counts), 1.0)
    losses = (r_c / n_c - r_r / n_r - 1.0 / (2.0 * beta)) ** 2
  else:  # robust
    eps = float(label_smoothing)
    losses = (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)
  return jnp.mean(losses), reward_metrics(beta * r_c, beta * r_r, pc, pr)
