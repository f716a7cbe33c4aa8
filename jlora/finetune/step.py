"""The jitted train step of any task: gradient accumulation, the variant's regularizer, the optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jlora

Params = Any
# (params, micro_batch, key) -> (total, count, metrics): a task's loss (jlora.finetune.tasks.base.Task.loss)
LossFn = Callable[[Params, dict, Any], tuple[jax.Array, jax.Array, dict]]


def make_train_step(loss: LossFn, tx: optax.GradientTransformation, *, remat: bool, use_dropout: bool,
                    regularizer: Callable[[Params], jax.Array] | None = None, shardings=None) -> Callable:
  """The jitted step ``(adapters, opt_state, frozen, batch, key) -> (adapters, opt_state, loss, grad_norm,
  metrics)``.

  ``batch`` holds ``grad_accum`` micro-batches on its leading axis; their gradients are summed
  and divided by the summed ``count`` (so the step's loss is ``Σ total / Σ count`` whatever the
  split). Each metric is the mean of its micro-batch values, NaN ignored (a value a micro-batch
  cannot compute, such as KTO's rewards of a label it lacks), NaN if none has one. ``regularizer(adapters)`` (AdaLoRA's orthogonality) is added to the mean loss.
  ``remat`` checkpoints each micro-batch's whole loss (models that cannot rematerialise per
  layer themselves). ``shardings``: those of ``(adapters, opt_state)``, kept by the outputs so
  that the step compiles once.
  """

  def micro_loss(adapters, frozen, mb, key):
    total, count, metrics = loss(jlora.combine(adapters, frozen), mb, key)
    if regularizer is not None:  # per unit of count, so that the step's mean gets it once
      total = total + regularizer(adapters) * count
    return total, (count, metrics)

  if remat:
    micro_loss = jax.checkpoint(micro_loss, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

  def step(adapters, opt_state, frozen, batch, key):
    accum = jax.tree.leaves(batch)[0].shape[0]
    keys = jax.random.split(key, accum)

    def micro(carry, xs):
      g_acc, l_acc, n_acc, m_acc = carry
      mb, k = xs
      (l, (n, m)), g = jax.value_and_grad(micro_loss, has_aux=True)(adapters, frozen, mb,
                                                                      k if use_dropout else None)
      m_acc = jax.tree.map(lambda acc, v: (acc[0] + jnp.where(jnp.isnan(v), 0.0, v), acc[1] + ~jnp.isnan(v)),
                           m_acc, m, is_leaf=lambda x: isinstance(x, tuple))
      return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, n_acc + n, m_acc), None

    zeros = jax.tree.map(jnp.zeros_like, adapters)
    metric_zeros = jax.tree.map(lambda s: (jnp.zeros(s.shape, jnp.float32), jnp.zeros(s.shape, jnp.float32)),
                                jax.eval_shape(lambda: micro_loss(adapters, frozen,
                                                                  jax.tree.map(lambda x: x[0], batch), None)[1][1]))
    (g, loss_sum, n, m), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0, metric_zeros), (batch, keys))
    n = jnp.maximum(n, 1.0)
    g = jax.tree.map(lambda x: x / n, g)
    updates, opt_state = tx.update(g, opt_state, adapters)
    metrics = jax.tree.map(lambda acc: jnp.where(acc[1] > 0, acc[0] / jnp.maximum(acc[1], 1.0), jnp.nan), m,
                           is_leaf=lambda x: isinstance(x, tuple))
    return optax.apply_updates(adapters, updates), opt_state, loss_sum / n, optax.tree.norm(g), metrics

  if shardings is None:
    return jax.jit(step, donate_argnums=(0, 1))
  replicated = jax.sharding.NamedSharding(jax.tree.leaves(shardings)[0].mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, donate_argnums=(0, 1), out_shardings=(*shardings, replicated, replicated, replicated))
