"""Test helpers: an independent dense oracle (NumPy, float64) and adapter randomisation."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

import jlora


def cpu_devices_env(devices: int) -> dict:
  """The environment for a subprocess with ``devices`` fake CPU devices (other XLA flags kept)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count=")]
  return {**os.environ, "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
          "JAX_PLATFORMS": "cpu"}


def randomize(lora_params, key, *, scale: float = 0.5):
  """Gives every adapter random non-zero A and B (B = 0 after init hides bugs)."""
  leaves = [x for x in jax.tree.leaves(lora_params, is_leaf=jlora.LoraWeight.__instancecheck__)
            if isinstance(x, jlora.LoraWeight)]
  keys = iter(jax.random.split(key, 2 * len(leaves)))

  def fill(x):
    if not isinstance(x, jlora.LoraWeight):
      return x
    a = scale * jax.random.normal(next(keys), x.a.shape, x.a.dtype)
    b = scale * jax.random.normal(next(keys), x.b.shape, x.b.dtype)
    return x.replace(a=a, b=b)

  return jax.tree.map(fill, lora_params, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))


def oracle_kernel(w: jlora.LoraWeight) -> np.ndarray:
  """W0 + scale·(A⊗B) computed densely in float64 with NumPy from the layout alone."""
  spec = w.spec
  nd = len(spec.shape)
  a = np.asarray(w.a, np.float64)
  b = np.asarray(w.b, np.float64)
  batch, ins, outs = spec.batch_axes, spec.in_axes, spec.out_axes
  in_size = int(np.prod([spec.shape[i] for i in ins]))
  out_size = int(np.prod([spec.shape[i] for i in outs]))
  bsz = int(np.prod([spec.shape[i] for i in batch])) if batch else 1
  a2 = a.reshape(bsz, in_size, spec.rank)
  b2 = b.reshape(bsz, spec.rank, out_size)
  d = np.matmul(a2, b2)  # (batch, in, out)
  d = d.reshape(*[spec.shape[i] for i in batch], *[spec.shape[i] for i in ins],
                *[spec.shape[i] for i in outs])
  order = list(batch) + list(ins) + list(outs)
  d = np.transpose(d, np.argsort(order))
  assert d.shape == spec.shape[:nd]
  return np.asarray(w.w0, np.float64) + spec.scale * d


def oracle_params(lora_params):
  """Plain params with each LoraWeight replaced by its dense oracle kernel (W0's dtype)."""
  def dense(x):
    if isinstance(x, jlora.LoraWeight):
      return jnp.asarray(oracle_kernel(x), dtype=x.w0.dtype)
    return x

  return jax.tree.map(dense, lora_params, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))


def assert_close(actual, expected, *, rtol: float, atol: float):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)
