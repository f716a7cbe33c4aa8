"""A shape-only GPT decoder (GPT-2/GPT-3 architecture) with stacked layers under ``lax.scan``.

Used by the memory report to size models from their shapes alone, e.g. the LoRA
paper's GPT-3 175B (96 layers, d = 12288, 96 heads, context 2048, vocabulary
50257). Each layer is rematerialised (``jax.checkpoint``), as a 175B training
run must be; the embedding is tied to the output projection as in GPT-2/3.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jlora._config import KernelLayout


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTConfig:
  """Sizes of a GPT decoder."""

  # Number of layers.
  layers: int
  # Model width.
  d: int
  # Attention heads.
  heads: int
  # Vocabulary size.
  vocab: int = 50257
  # Context length (position embeddings).
  context: int = 2048
  # MLP width multiple of d.
  ffn_mult: int = 4
  # Weights dtype.
  dtype: str = "float16"

  def __post_init__(self):
    for name in ("layers", "d", "heads", "vocab", "context", "ffn_mult"):
      if getattr(self, name) < 1:
        raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}.")
    if self.d % self.heads:
      raise ValueError(f"GPTConfig: d={self.d} is not a multiple of heads={self.heads}.")


PRESETS = {
    "gpt3-175b": GPTConfig(layers=96, d=12288, heads=96),
    "gpt3-6.7b": GPTConfig(layers=32, d=4096, heads=32),
    "gpt-tiny": GPTConfig(layers=2, d=64, heads=4, vocab=256, context=64, dtype="float32"),
}


def param_shapes(cfg: GPTConfig) -> dict[str, Any]:
  """The parameters as ``jax.ShapeDtypeStruct``s (stacked layers on axis 0)."""
  dt = jnp.dtype(cfg.dtype)
  L, d, f = cfg.layers, cfg.d, cfg.ffn_mult * cfg.d
  s = lambda *shape: jax.ShapeDtypeStruct(shape, dt)
  dense = lambda i, o: {"kernel": s(L, i, o), "bias": s(L, o)}
  return {
      "wte": {"embedding": s(cfg.vocab, d)},
      "wpe": {"embedding": s(cfg.context, d)},
      "layers": {
          "ln_1": {"scale": s(L, d), "bias": s(L, d)},
          "attn": {"query": dense(d, d), "key": dense(d, d), "value": dense(d, d), "out": dense(d, d)},
          "ln_2": {"scale": s(L, d), "bias": s(L, d)},
          "mlp": {"fc": dense(d, f), "proj": dense(f, d)},
      },
      "ln_f": {"scale": s(d), "bias": s(d)},
  }


def layouts(params: dict[str, Any]) -> dict[str, KernelLayout]:
  """Kernel layouts of every stacked kernel (``(layers, in, out)``) and the tied embedding."""
  out = {"wte/embedding": KernelLayout(in_axes=(0,), embedding=True),
         "wpe/embedding": KernelLayout(in_axes=(0,), embedding=True)}
  for group, names in (("attn", ("query", "key", "value", "out")), ("mlp", ("fc", "proj"))):
    for n in names:
      out[f"layers/{group}/{n}/kernel"] = KernelLayout(in_axes=(1,), batch_axes=(0,))
  return out


def _ln(x, p):
  x32 = x.astype(jnp.float32)
  mu = x32.mean(-1, keepdims=True)
  var = ((x32 - mu) ** 2).mean(-1, keepdims=True)
  return ((x32 - mu) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]).astype(x.dtype)


def forward(cfg: GPTConfig, params: dict[str, Any], ids: jax.Array) -> jax.Array:
  """Logits ``(batch, seq, vocab)`` of a causal GPT decoder."""
  b, t = ids.shape
  h = params["wte"]["embedding"][ids] + params["wpe"]["embedding"][:t][None]
  hd = cfg.d // cfg.heads
  mask = jnp.tril(jnp.ones((t, t), bool))

  def layer(h, p):
    x = _ln(h, p["ln_1"])
    proj = lambda n, x: x @ p["attn"][n]["kernel"] + p["attn"][n]["bias"]
    q, k, v = (proj(n, x).reshape(b, t, cfg.heads, hd) for n in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(hd, q.dtype))
    scores = jnp.where(mask, scores.astype(jnp.float32), -1e9)
    att = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    h = h + proj("out", jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, cfg.d))
    x = _ln(h, p["ln_2"])
    m = jax.nn.gelu(x @ p["mlp"]["fc"]["kernel"] + p["mlp"]["fc"]["bias"])
    return h + m @ p["mlp"]["proj"]["kernel"] + p["mlp"]["proj"]["bias"], None

  h, _ = jax.lax.scan(jax.checkpoint(layer), h, params["layers"])
  h = _ln(h, params["ln_f"])
  return h @ params["wte"]["embedding"].T


def loss_fn(cfg: GPTConfig):
  """``loss(params, ids)``: next-token cross-entropy in float32."""

  def loss(params, ids):
    logits = forward(cfg, params, ids)[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  return loss
