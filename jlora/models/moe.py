"""Mixture-of-experts layers: routing, the two dispatches of the experts, the load-balancing loss.

Routing follows transformers 4.57.6 per family (``ModelConfig.routing``):
Mixtral and Qwen take the softmax of the router logits in float32, then the top
k (renormalised when ``norm_topk_prob``; Mixtral always), and cast the weights to
the compute dtype; gpt-oss takes the top k of the logits, then a softmax over
those in the logits' dtype. Router logits are computed in the compute dtype.

Both dispatches are dropless (no capacity factor: every token reaches its k
experts) and consume each expert kernel ``(E, in, out)`` in one primitive per
projection, which is what ``jlora.wrap`` sees:

* ``"ragged"``: the ``T·k`` (token, expert) pairs are sorted by expert and each
  projection is one ``jax.lax.ragged_dot`` (a grouped matmul) over the groups;
  the outputs are weighted, put back in token order and summed over k. Native on
  TPU and GPU; XLA:CPU expands it into a dense masked product over every expert
  for every pair (``E·T·k`` rows of work instead of ``T·k``).
* ``"dense"``: every expert runs on every token, as a ``dot_general`` whose batch
  axis is the expert axis (``E·T`` rows), and a ``(T, E)`` matrix of routing
  weights (zero off the top k) combines them. k times fewer FLOPs than XLA:CPU's
  ``ragged_dot`` and no sort; ``E/k`` times the work of a grouped kernel.

``"auto"`` takes ``"dense"`` on CPU and ``"ragged"`` elsewhere
(``benchmarks/moe_dispatch.py`` measured it on CPU; see ``docs/models.md``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jlora.models.config import ModelConfig

DISPATCHES = ("auto", "ragged", "dense")
# gpt-oss' clamped SwiGLU (GptOssExperts): alpha and limit.
GPT_OSS_ALPHA = 1.702
GPT_OSS_LIMIT = 7.0


def resolve_dispatch(dispatch: str) -> str:
  """``"ragged"`` or ``"dense"``; ``"auto"`` is ``"dense"`` on the CPU backend, ``"ragged"`` on TPU and GPU.

  Example:
    >>> from jlora.models.moe import resolve_dispatch
    >>> resolve_dispatch("ragged")
    'ragged'
  """
  if dispatch not in DISPATCHES:
    raise ValueError(f"moe_dispatch must be one of {DISPATCHES}, got {dispatch!r}.")
  if dispatch != "auto":
    return dispatch
  return "dense" if jax.default_backend() == "cpu" else "ragged"


def route(logits: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """``(weights (T, k) in the logits' dtype, experts (T, k) int32)`` from router logits ``(T, E)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.models import ModelConfig
    >>> from jlora.models.moe import route
    >>> cfg = ModelConfig.from_hf({"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32,
    ...   "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4, "num_local_experts": 4})
    >>> w, e = route(jnp.array([[0.0, 2.0, 1.0, 2.5]]), cfg)
    >>> e.tolist(), round(float(w.sum()), 6)
    ([[3, 1]], 1.0)
  """
  k = cfg.num_experts_per_tok
  if cfg.routing == "topk_softmax":  # GptOssTopKRouter: top k of the logits, softmax in their dtype
    top, experts = lax.top_k(logits, k)
    return jax.nn.softmax(top, axis=-1), experts.astype(jnp.int32)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # Mixtral/Qwen: float32 softmax over all
  weights, experts = lax.top_k(probs, k)
  if cfg.norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights.astype(logits.dtype), experts.astype(jnp.int32)


def _linear(x: jax.Array, p: Any) -> jax.Array:
  y = jnp.matmul(x, p["kernel"])
  return y + p["bias"] if "bias" in p else y


def _clamped_swiglu(gate_up: jax.Array) -> jax.Array:
  """gpt-oss: columns interleaved (gate, up); ``(clip(up) + 1) * g * sigmoid(alpha g)``, ``g = min(gate, limit)``."""
  gate, up = gate_up[..., ::2], gate_up[..., 1::2]
  gate = jnp.minimum(gate, GPT_OSS_LIMIT)
  up = jnp.clip(up, -GPT_OSS_LIMIT, GPT_OSS_LIMIT)
  return (up + 1) * (gate * jax.nn.sigmoid(gate * GPT_OSS_ALPHA))


def _experts_ragged(x, ex, weights, experts, cfg: ModelConfig, act):
  t, k = experts.shape
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
  sizes = jnp.bincount(flat, length=cfg.num_experts).astype(jnp.int32)
  xs = jnp.take(x, order // k, axis=0)
  if cfg.expert_mlp == "gpt_oss":
    ids = jnp.take(flat, order)
    gu = lax.ragged_dot(xs, ex["gate_up_proj"]["kernel"], sizes) + jnp.take(ex["gate_up_proj"]["bias"], ids, axis=0)
    y = lax.ragged_dot(_clamped_swiglu(gu), ex["down_proj"]["kernel"], sizes)
    y = y + jnp.take(ex["down_proj"]["bias"], ids, axis=0)
  else:
    g = lax.ragged_dot(xs, ex["gate_proj"]["kernel"], sizes)
    u = lax.ragged_dot(xs, ex["up_proj"]["kernel"], sizes)
    y = lax.ragged_dot(act(g) * u, ex["down_proj"]["kernel"], sizes)
  y = y * jnp.take(weights.reshape(-1), order)[:, None]
  unsorted = jnp.zeros_like(y).at[order].set(y, unique_indices=True)
  return jnp.sum(unsorted.reshape(t, k, -1), axis=1)


def _experts_dense(x, ex, weights, experts, cfg: ModelConfig, act):
  e = cfg.num_experts
  xe = jnp.broadcast_to(x, (e, *x.shape))  # the expert axis is a batch axis of every expert matmul
  if cfg.expert_mlp == "gpt_oss":
    gu = jnp.einsum("etd,edf->etf", xe, ex["gate_up_proj"]["kernel"]) + ex["gate_up_proj"]["bias"][:, None]
    y = jnp.einsum("etf,efd->etd", _clamped_swiglu(gu), ex["down_proj"]["kernel"]) + ex["down_proj"]["bias"][:, None]
  else:
    g = jnp.einsum("etd,edf->etf", xe, ex["gate_proj"]["kernel"])
    u = jnp.einsum("etd,edf->etf", xe, ex["up_proj"]["kernel"])
    y = jnp.einsum("etf,efd->etd", act(g) * u, ex["down_proj"]["kernel"])
  combine = jnp.sum(jax.nn.one_hot(experts, e, dtype=weights.dtype) * weights[..., None], axis=1)  # (T, E)
  return jnp.einsum("etd,te->td", y, combine)


def moe_mlp(h: jax.Array, m: Any, cfg: ModelConfig, *, dispatch: str, act) -> tuple[jax.Array, jax.Array]:
  """A sparse MLP on ``h (B, T, d)``: ``(output (B, T, d), router logits (B, T, E))``.

  ``m`` holds ``router``, ``experts`` and (Qwen2-MoE) ``shared_expert`` /
  ``shared_expert_gate``; ``dispatch`` is ``"ragged"`` or ``"dense"``.
  """
  b, t, d = h.shape
  x = h.reshape(b * t, d)
  logits = _linear(x, m["router"])
  weights, experts = route(logits, cfg)
  run = _experts_ragged if dispatch == "ragged" else _experts_dense
  y = run(x, m["experts"], weights, experts, cfg, act)
  if "shared_expert" in m:  # Qwen2MoeSparseMoeBlock: + sigmoid(x . w) * shared(x)
    s = m["shared_expert"]
    shared = _linear(act(_linear(x, s["gate_proj"])) * _linear(x, s["up_proj"]), s["down_proj"])
    y = y + jax.nn.sigmoid(_linear(x, m["shared_expert_gate"])) * shared
  return y.reshape(b, t, d), logits.reshape(b, t, -1)


def load_balancing_loss(router_logits: jax.Array, top_k: int, attention_mask: jax.Array | None = None) -> jax.Array:
  """The Switch-Transformer load-balancing loss, as transformers' ``load_balancing_loss_func``.

  With ``p`` the softmax of each token's router logits, ``f[k, e]`` the fraction
  of tokens whose k-th choice is expert ``e`` and ``P[e]`` the mean of ``p[e]``
  (both over every MoE layer and real token): ``E * sum_k sum_e f[k, e] * P[e]``.
  Uniform routing gives ``top_k`` (not 1), as in transformers. ``f`` has no
  gradient; the loss reaches the router (and what feeds it) through ``P``.

  Differences from transformers 4.57.6: the softmax runs in float32 (transformers:
  the logits' dtype; the same for float32 logits). Pass the raw router logits
  that ``model(..., return_router_logits=True)`` returns for every family:
  transformers' gpt-oss records its router *scores* (the top-k softmax scattered
  into ``(T, E)``) instead and so takes a softmax of probabilities; to reproduce
  its ``aux_loss``, pass those scores.

  Args:
    router_logits: ``(..., B, T, E)``: any leading axes (the MoE layers) are
      pooled with the tokens.
    top_k: the model's ``num_experts_per_tok``.
    attention_mask: ``(B, T)``, 1 for real tokens; padding drops out of ``f`` and ``P``.

  Returns:
    A float32 scalar (multiply by ``config.router_aux_loss_coef`` to add it to a loss).

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.models import load_balancing_loss
    >>> float(load_balancing_loss(jnp.zeros((2, 1, 3, 4)), 2))  # uniform probabilities: top_k
    2.0
  """
  logits = jnp.asarray(router_logits)
  if logits.ndim < 3:
    raise ValueError(f"router_logits must be (..., batch, length, experts), got shape {logits.shape}.")
  num_experts = logits.shape[-1]
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"top_k must be in [1, {num_experts}] (the number of experts), got {top_k}.")
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  _, chosen = lax.top_k(probs, top_k)
  b, t = logits.shape[-3:-1]
  mask = jnp.ones((b, t), jnp.float32) if attention_mask is None else jnp.asarray(attention_mask, jnp.float32)
  if mask.shape != (b, t):
    raise ValueError(f"attention_mask must be (batch, length) = {(b, t)}, got {mask.shape}.")
  mask = jnp.broadcast_to(mask, logits.shape[:-1])
  count = jnp.sum(mask)
  axes = tuple(range(logits.ndim - 1))
  f = jnp.sum(jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32) * mask[..., None, None], axis=axes) / count
  p = jnp.sum(probs * mask[..., None], axis=axes) / count
  return num_experts * jnp.sum(f * p[None, :])
