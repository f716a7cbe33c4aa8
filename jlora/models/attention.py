"""Attention: masks (causal, padding, packed segments, sliding window) and the kernel.

The kernel is ``jax.nn.dot_product_attention`` — XLA everywhere, cuDNN's fused
kernel on GPU where its shape/dtype limits allow. Gemma 2's logit soft-capping
(``cap * tanh(s / cap)`` before the softmax) and gpt-oss' attention sinks (a
learned logit per head that joins the softmax) are not expressible there, so
those models use a plain XLA implementation (same math, float32 logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def make_mask(*, q_slots: jax.Array, k_slots: jax.Array, k_valid: jax.Array, q_positions: jax.Array,
              k_positions: jax.Array, window: int | None, q_segments: jax.Array | None = None,
              k_segments: jax.Array | None = None) -> jax.Array:
  """A boolean ``(B, 1, T, S)`` mask: True where query t may attend to key s.

  Causality is by slot (a key written at or before the query's slot), padding
  by ``k_valid``, the sliding window by position (``q_pos - k_pos < window``,
  transformers' convention), and packed examples by equal segment ids.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.models.attention import make_mask
    >>> s = jnp.arange(3)
    >>> m = make_mask(q_slots=s, k_slots=s, k_valid=jnp.ones((1, 3), bool), q_positions=s[None],
    ...               k_positions=s[None], window=2)
    >>> m[0, 0].astype(int).tolist()
    [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
  """
  mask = (k_slots[None, None, :] <= q_slots[None, :, None]) & k_valid[:, None, :]
  if window is not None:
    mask &= (q_positions[:, :, None] - k_positions[:, None, :]) < window
  if q_segments is not None:
    mask &= q_segments[:, :, None] == k_segments[:, None, :]
  return mask[:, None]


def _cudnn_ok(q: jax.Array, k: jax.Array) -> bool:
  if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
    return False
  head_dim = q.shape[-1]
  return head_dim % 8 == 0 and head_dim <= 128 and q.shape[1] > 1


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float,
           softcap: float | None = None, sinks: jax.Array | None = None, implementation: str = "auto") -> jax.Array:
  """Grouped-query attention ``(B, T, N, H) x (B, S, K, H) -> (B, T, N, H)``.

  ``implementation``: ``"auto"`` (cuDNN on GPU for bf16/fp16 when the shapes
  allow, else XLA), ``"xla"`` or ``"cudnn"`` (an error where unsupported).
  ``sinks`` (``(N,)``, gpt-oss): each head's logit joins the softmax as an
  extra key without a value, so a row's weights sum to less than 1.
  Rows whose keys are all masked (padding queries) give finite, meaningless
  outputs, as in ``jax.nn.dot_product_attention``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.models.attention import attend
    >>> q = jnp.ones((1, 2, 4, 8)); kv = jnp.ones((1, 2, 2, 8)); m = jnp.ones((1, 1, 2, 2), bool)
    >>> attend(q, kv, kv, m, scale=0.35).shape
    (1, 2, 4, 8)
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
  if softcap is not None or sinks is not None:
    if implementation == "cudnn":
      raise ValueError("attention soft-capping (Gemma 2) and attention sinks (gpt-oss) have no cuDNN kernel; use "
                       "implementation='xla'.")
    return _eager(q, k, v, mask, scale=scale, softcap=softcap, sinks=sinks)
  impl = "xla"
  if implementation == "cudnn" or (implementation == "auto" and _cudnn_ok(q, k)):
    impl = "cudnn"
  if impl == "cudnn" and implementation == "auto":
    try:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    except (ValueError, NotImplementedError, RuntimeError):  # shapes cuDNN rejects at trace time
      impl = "xla"
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)


def _eager(q, k, v, mask, *, scale: float, softcap: float | None, sinks: jax.Array | None) -> jax.Array:
  """Eager attention with ``softcap * tanh(logits / softcap)`` (transformers' Gemma 2) and/or
  attention sinks (transformers' gpt-oss: the sink column joins the softmax, then is dropped)."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  g = n // kv_heads
  qg = q.reshape(b, t, kv_heads, g, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  big_neg = jnp.finfo(jnp.float32).min / 2
  logits = jnp.where(mask[:, :, None], logits, big_neg)  # mask (B, 1, T, S) -> (B, 1, 1, T, S)
  if sinks is None:
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  else:
    sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, kv_heads, g, 1, 1), (b, kv_heads, g, t, 1))
    probs = jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)[..., :-1].astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype).reshape(b, t, n, h)
