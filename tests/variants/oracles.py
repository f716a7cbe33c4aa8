"""Float64 NumPy oracles for the variants, computed densely from the layout alone."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from helpers import oracle_kernel


def per_output(spec, x) -> np.ndarray:
  """A ``(*batch, *out)`` array laid out to broadcast against the kernel (float64)."""
  x = np.asarray(x, np.float64)
  order = list(spec.batch_axes) + list(spec.out_axes)
  x = np.transpose(x, np.argsort(order)) if len(order) > 1 else x
  return x.reshape([spec.shape[i] if i in order else 1 for i in range(len(spec.shape))])


def plain(w: jlora.LoraWeight) -> jlora.LoraWeight:
  spec = dataclasses.replace(w.spec, variant=jlora.Variant())
  return jlora.LoraWeight(w.w0, w.a, w.b, spec)


def dora_kernel(w: jlora.LoraWeight) -> np.ndarray:
  """(m / ‖W0 + s·AB‖) ⊙ (W0 + s·AB), the norm over the input axes."""
  v = oracle_kernel(plain(w))
  n = np.sqrt(np.sum(v * v, axis=w.spec.in_axes, keepdims=True))
  return per_output(w.spec, w.factors["magnitude"]) * v / n


def dense_params(lp, kernel_fn):
  def dense(x):
    if isinstance(x, jlora.LoraWeight):
      return jnp.asarray(kernel_fn(x), x.w0.dtype)
    return x

  return jax.tree.map(dense, lp, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))


def randomize_children(lp, key, names, *, low=0.5, high=1.5):
  """Multiplies the named extra children by U(low, high) (their init value hides bugs)."""
  ws = [x for x in jax.tree.leaves(lp, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
        if isinstance(x, jlora.LoraWeight)]
  keys = iter(jax.random.split(key, len(ws) * len(names)))

  def fill(x):
    if not isinstance(x, jlora.LoraWeight):
      return x
    new = {n: x.factors[n] * jax.random.uniform(next(keys), x.factors[n].shape, minval=low, maxval=high)
           for n in names}
    return x.replace(**new)

  return jax.tree.map(fill, lp, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
