"""Float32 matrix decompositions on kernels laid out by a ``LoraSpec``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora._weight import LoraSpec

HI = jax.lax.Precision.HIGHEST


def as_matrices(spec: LoraSpec, w: jax.Array) -> jax.Array:
  """A kernel as ``(batch, out, in)`` float32 matrices (PyTorch's ``[out, in]`` orientation)."""
  order = (*spec.batch_axes, *spec.out_axes, *spec.in_axes)
  m = jnp.transpose(jnp.asarray(w, jnp.float32), order)
  return m.reshape(-1, spec.fan_out, spec.fan_in)


def from_matrices(spec: LoraSpec, m: jax.Array) -> jax.Array:
  """Inverse of ``as_matrices``: ``(batch, out, in)`` back to the kernel layout."""
  shape = spec.shape
  order = (*spec.batch_axes, *spec.out_axes, *spec.in_axes)
  m = m.reshape([shape[i] for i in order])
  return jnp.transpose(m, [order.index(i) for i in range(len(shape))])


def factors_from_torch(spec: LoraSpec, a_t: jax.Array, b_t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """PyTorch-oriented ``A (batch, r, in)``, ``B (batch, out, r)`` as jlora's ``a``, ``b``."""
  nb = len(spec.batch_axes)
  batch = spec.a_shape[:nb]
  a = jnp.swapaxes(a_t, -1, -2).reshape(*batch, *spec.a_shape[nb:])
  b = jnp.swapaxes(b_t, -1, -2).reshape(*batch, *spec.b_shape[nb:])
  return a, b


def factors_to_torch(spec: LoraSpec, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Inverse of ``factors_from_torch``."""
  a = jnp.asarray(a, jnp.float32).reshape(-1, spec.fan_in, a.shape[-1])
  nb = len(spec.batch_axes)
  b = jnp.asarray(b, jnp.float32).reshape(-1, b.shape[nb], spec.fan_out)
  return jnp.swapaxes(a, -1, -2), jnp.swapaxes(b, -1, -2)


def randomized_svd(key: jax.Array, m: jax.Array, q: int, niter: int):
  """``torch.svd_lowrank(m, q, niter)`` (Halko et al. 2009, Alg. 4.4 + 5.1) for one matrix.

  Returns ``U (rows, q)``, ``S (q,)``, ``V (cols, q)`` with ``m ≈ U·diag(S)·Vᵀ``.
  """
  rows, cols = m.shape
  tall = m if rows >= cols else m.T
  r = jax.random.normal(key, (tall.shape[1], q), jnp.float32)
  qm = jnp.linalg.qr(jnp.matmul(tall, r, precision=HI))[0]
  for _ in range(niter):
    qm = jnp.linalg.qr(jnp.matmul(tall.T, qm, precision=HI))[0]
    qm = jnp.linalg.qr(jnp.matmul(tall, qm, precision=HI))[0]
  u, s, vh = jnp.linalg.svd(jnp.matmul(qm.T, tall, precision=HI), full_matrices=False)
  u = jnp.matmul(qm, u, precision=HI)
  v = vh.T
  return (u, s, v) if rows >= cols else (v, s, u)
