"""What the losses share: option checks and TRL's reward metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]


def check_positive(fn: str, name: str, value, *, why: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise ValueError(f"{fn}: {name} must be a positive number ({why}), got {value!r}.")
  return float(value)


def check_nonnegative(fn: str, name: str, value, *, why: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
    raise ValueError(f"{fn}: {name} must be a number >= 0 ({why}), got {value!r}.")
  return float(value)


def check_choice(fn: str, name: str, value, choices: tuple[str, ...]) -> str:
  if value not in choices:
    raise ValueError(f"{fn}: unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}.")
  return value


def check_same_shape(fn: str, **arrays) -> None:
  shapes = {k: jnp.shape(v) for k, v in arrays.items() if v is not None}
  first = next(iter(shapes.values()))
  if len(first) != 1 or any(s != first for s in shapes.values()):
    listed = ", ".join(f"{k} {s}" for k, s in shapes.items())
    raise ValueError(f"{fn}: expected one value per example, all of the same shape (batch,); got {listed}.")


def f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> Metrics:
  """TRL's paired metrics: batch means, detached."""
  cr, rr = jax.lax.stop_gradient(chosen_rewards), jax.lax.stop_gradient(rejected_rewards)
  return {
      "rewards/chosen": jnp.mean(cr),
      "rewards/rejected": jnp.mean(rr),
      "rewards/accuracies": jnp.mean((cr > rr).astype(jnp.float32)),
      "rewards/margins": jnp.mean(cr - rr),
      "logps/chosen": jnp.mean(jax.lax.stop_gradient(chosen_logps)),
      "logps/rejected": jnp.mean(jax.lax.stop_gradient(rejected_logps)),
  }
