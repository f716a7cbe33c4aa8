"""Rotary position embeddings: inverse frequencies for the default, linear, llama3 and
yarn RoPE types (the formulas of transformers' ``modeling_rope_utils``), and their
application in the "rotate half" layout of Hugging Face checkpoints."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jlora.models.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int, *, max_position_embeddings: int) -> tuple[np.ndarray, float]:
  """``(inv_freq (head_dim // 2,) float32, attention_scaling)`` for one RoPE configuration.

  Computed in float64 and rounded once to float32. ``attention_scaling``
  multiplies cos and sin (1 except for yarn).

  Example:
    >>> from jlora.models import RopeConfig
    >>> from jlora.models.rope import inverse_frequencies
    >>> inv, s = inverse_frequencies(RopeConfig(theta=10000.0), 8, max_position_embeddings=64)
    >>> [round(float(x), 4) for x in inv], s
    ([1.0, 0.1, 0.01, 0.001], 1.0)
  """
  dim = head_dim
  base = rope.theta
  exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
  inv = 1.0 / base ** exponents
  scaling = 1.0
  if rope.rope_type == "linear":
    inv = inv / rope.factor
  elif rope.rope_type == "llama3":
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  elif rope.rope_type == "yarn":
    inv, scaling = _yarn(rope, dim, max_position_embeddings)
  return inv.astype(np.float32), float(scaling)


def _yarn(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
  factor, base = rope.factor, rope.theta
  original = rope.original_max_position_embeddings or max_position_embeddings

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  scaling = rope.attention_factor
  if scaling is None:
    if rope.mscale and rope.mscale_all_dim:
      scaling = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
    else:
      scaling = mscale(factor)
  beta_fast = rope.beta_fast or 32
  beta_slow = rope.beta_slow or 1

  def correction_dim(rotations):
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if rope.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # avoid a zero-width ramp, as transformers does
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
  extrapolation = 1 - ramp
  pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
  return inv, float(scaling)


def cos_sin(positions: jax.Array, inv_freq: np.ndarray, scaling: float, dtype) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables ``(*positions.shape, head_dim)`` in ``dtype`` (computed in float32).

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from jlora.models.rope import cos_sin
    >>> c, s = cos_sin(jnp.arange(3)[None], np.ones(2, np.float32), 1.0, jnp.float32)
    >>> c.shape
    (1, 3, 4)
  """
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return (jnp.cos(emb) * scaling).astype(dtype), (jnp.sin(emb) * scaling).astype(dtype)


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x`` (``(B, T, heads, head_dim)``) by tables of shape ``(B, T, head_dim)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.models.rope import apply
    >>> apply(jnp.ones((1, 2, 1, 4)), jnp.ones((1, 2, 4)), jnp.zeros((1, 2, 4))).shape
    (1, 2, 1, 4)
  """
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
