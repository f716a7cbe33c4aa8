"""``Decoder``: one parametric decoder-only transformer for every supported family.

Parameters are plain nested dicts; per-layer parameters are stacked along a
leading layer axis and the layers run under ``jax.lax.scan`` (compile time
does not grow with depth), optionally with per-layer rematerialisation. LoRA
kernels reach their matmuls only through the scan's slicing, so
``jlora.wrap(model)`` serves them (see ``docs/models.md``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora._config import KernelLayout
from jlora._targets import expand_targets
from jlora.models import attention as attn_lib
from jlora.models import moe as moe_lib
from jlora.models import rope as rope_lib
from jlora.models.config import ModelConfig
from jlora.models.groups import group_params, layer_groups
from jlora.models.names import module_name, param_table
from jlora.peft import ModuleMap

Params = dict[str, Any]
Cache = dict[str, jax.Array]
REMAT_POLICIES = ("none", "full", "dots")
# The routers of a MoE layer: linear kernels that "all-linear" leaves out (they are adapted only when named).
ROUTERS = ("router", "shared_expert_gate")
_ACT = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float, plus_one: bool,
             scale_in_float32: bool = False) -> jax.Array:
  """RMSNorm in float32; Llama-style ``w * norm(x)`` or Gemma-style ``norm(x) * (1 + w)``.

  ``scale_in_float32``: gpt-oss' ``w * norm(x)`` in float32, cast afterwards (Llama casts first).

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.models.decoder import rms_norm
    >>> [round(float(v), 4) for v in rms_norm(jnp.array([3.0, 4.0]), jnp.ones(2), eps=0.0, plus_one=False)]
    [0.8485, 1.1314]
  """
  xf = x.astype(jnp.float32)
  xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  if plus_one:  # transformers' Gemma: (x * (1 + w)) in float32, then cast
    return (xf * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
  if scale_in_float32:  # transformers' gpt-oss
    return (scale.astype(jnp.float32) * xf).astype(x.dtype)
  return (scale * xf.astype(x.dtype)).astype(x.dtype)  # Llama: cast first, then scale


def _linear(x: jax.Array, p: Params) -> jax.Array:
  y = jnp.matmul(x, p["kernel"])
  return y + p["bias"] if "bias" in p else y


def _nest(flat: dict[str, Any]) -> Params:
  out: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def default_positions(batch: int, length: int, *, attention_mask: jax.Array | None = None,
                      segment_ids: jax.Array | None = None) -> jax.Array:
  """Positions when none are given: per packed segment, else counted over real tokens.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.models.decoder import default_positions
    >>> default_positions(1, 5, segment_ids=jnp.array([[1, 1, 2, 2, 2]])).tolist()
    [[0, 1, 0, 1, 2]]
  """
  idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  if segment_ids is not None:
    seg = jnp.asarray(segment_ids)
    first = jnp.concatenate([jnp.ones((batch, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    return idx - lax.cummax(jnp.where(first, idx, 0), axis=1)
  if attention_mask is not None:
    return jnp.maximum(jnp.cumsum(jnp.asarray(attention_mask).astype(jnp.int32), axis=1) - 1, 0)
  return idx


@functools.partial(jax.tree_util.register_dataclass, data_fields=["weight"], meta_fields=["transposed", "softcap"])
@dataclasses.dataclass(frozen=True)
class Head:
  """A decoder's output projection: ``logits = softcap(x @ kernel)`` with ``kernel`` ``(D, V)``.

  A pytree whose only leaf is ``weight``; ``Decoder.head(params)`` builds it, and
  ``jlora.objectives.token_logprobs`` applies it in chunks. Models outside ``jlora.models``
  build one from their own output kernel.

  Attributes:
    weight: the parameter as stored: the ``lm_head`` kernel ``(D, V)``, or with ``transposed``
      the tied embedding table ``(V, D)``; a ``jlora.LoraWeight`` when it is adapted.
    transposed: ``weight`` is ``(V, D)`` and is contracted on its last axis (tied embeddings).
    softcap: the final-logit soft-cap ``c`` (``c·tanh(logits/c)``, Gemma 2/3), or ``None``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.models.decoder import Head
    >>> head = Head(jnp.ones((4, 8)), transposed=False, softcap=2.0)
    >>> round(float(head(jnp.ones((1, 4)))[0, 0]), 4)  # 2·tanh(4/2)
    1.9281
  """

  weight: Any
  transposed: bool = dataclasses.field(default=False, kw_only=True)
  softcap: float | None = dataclasses.field(default=None, kw_only=True)

  @property
  def kernel(self) -> jax.Array:
    """The projection as a ``(D, V)`` array (the tied table transposed); plain arrays only.

    Raises:
      ValueError: the head is adapted (a ``jlora.LoraWeight``), which has no dense kernel
        short of merging; use ``project`` under ``jlora.wrap``.
    """
    if not isinstance(self.weight, (jax.Array, np.ndarray, jax.core.Tracer)):
      raise ValueError(f"Head.kernel: the head weight is a {type(self.weight).__name__}, not an array (an adapted "
                       "head); apply it with head.project(x) under jlora.wrap, or pass the Head to "
                       "jlora.objectives.token_logprobs, which serves the adapter unmerged.")
    return self.weight.T if self.transposed else self.weight

  def project(self, x: jax.Array, *, preferred_element_type: Any = None) -> jax.Array:
    """``x @ kernel`` without the soft-cap: ``(..., D) -> (..., V)``."""
    if self.transposed:
      return jnp.einsum("...d,vd->...v", x, self.weight, preferred_element_type=preferred_element_type)
    return jnp.matmul(x, self.weight, preferred_element_type=preferred_element_type)

  def __call__(self, x: jax.Array) -> jax.Array:
    """The logits, soft-capped, in the dtype of ``x @ kernel`` (as ``Decoder.__call__`` returns them)."""
    logits = self.project(x)
    if self.softcap is not None:
      cap = jnp.asarray(self.softcap, logits.dtype)
      logits = jnp.tanh(logits / cap) * cap
    return logits


@dataclasses.dataclass(frozen=True)
class Decoder:
  """A decoder-only LM: ``logits = model(params, input_ids)``.

  Frozen and hashable (a valid static ``jit`` argument / cache key).

  Attributes:
    config: the ``ModelConfig``.
    remat: per-layer rematerialisation: ``"none"``; ``"full"`` (keep only each
      layer's input, recompute the rest in the backward pass); ``"dots"``
      (``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``: keep the
      projection outputs, recompute norms, activations and attention).
    attention: ``"auto"`` (cuDNN on GPU where allowed, else XLA), ``"xla"``, ``"cudnn"``.
    unroll_layers: compile the layer scan fully unrolled. XLA then fuses across layer
      boundaries (on CPU a LoRA step of a 768-wide model ran ~15% faster), but trace and
      compile time grow with depth again; the default keeps them flat.
    moe_dispatch: how a mixture-of-experts layer runs its experts (both dropless):
      ``"ragged"`` (tokens sorted by expert, one ``jax.lax.ragged_dot`` per projection),
      ``"dense"`` (every expert on every token, combined by the routing weights), or
      ``"auto"``: dense on CPU, ragged on TPU/GPU (``jlora.models.moe``). Dense models
      ignore it.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jlora.models import Decoder, ModelConfig
    >>> cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
    ...                             "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4})
    >>> model = Decoder(cfg)
    >>> params = model.init(jax.random.key(0))
    >>> model(params, jnp.array([[1, 2, 3]])).shape
    (1, 3, 64)
  """

  config: ModelConfig
  remat: str = dataclasses.field(default="none", kw_only=True)
  attention: str = dataclasses.field(default="auto", kw_only=True)
  unroll_layers: bool = dataclasses.field(default=False, kw_only=True)
  moe_dispatch: str = dataclasses.field(default="auto", kw_only=True)

  def __post_init__(self):
    if not isinstance(self.config, ModelConfig):
      raise ValueError(f"Decoder.config must be a jlora.models.ModelConfig, got {type(self.config).__name__}.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"Decoder.remat must be one of {REMAT_POLICIES}, got {self.remat!r}.")
    if not isinstance(self.unroll_layers, bool):
      raise ValueError(f"Decoder.unroll_layers must be a bool, got {self.unroll_layers!r}.")
    if self.attention not in attn_lib.IMPLEMENTATIONS:
      raise ValueError(f"Decoder.attention must be one of {attn_lib.IMPLEMENTATIONS}, got {self.attention!r}.")
    if self.moe_dispatch not in moe_lib.DISPATCHES:
      raise ValueError(f"Decoder.moe_dispatch must be one of {moe_lib.DISPATCHES}, got {self.moe_dispatch!r}.")

  # -- parameters --------------------------------------------------------------------------

  def shapes(self, dtype: Any = jnp.float32) -> Params:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (for ``eval_shape`` / sizing).

    Example:
      >>> from jlora.models import Decoder, ModelConfig
      >>> cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
      ...   "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4})
      >>> Decoder(cfg).shapes()["layers"]["mlp"]["down_proj"]["kernel"].shape
      (2, 48, 32)
    """
    return _nest({p.path: jax.ShapeDtypeStruct(p.shape, jnp.dtype(dtype)) for p in param_table(self.config)})

  def init(self, key: jax.Array, dtype: Any = jnp.float32, *, stddev: float = 0.02) -> Params:
    """Random parameters: kernels and embeddings ~ N(0, stddev²), norms neutral, biases zero.

    Example:
      >>> import jax
      >>> from jlora.models import Decoder, ModelConfig
      >>> cfg = ModelConfig.from_hf({"model_type": "gemma2", "vocab_size": 64, "hidden_size": 32,
      ...   "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 8})
      >>> float(Decoder(cfg).init(jax.random.key(0))["norm"]["scale"].sum())  # Gemma scales by 1 + w
      0.0
    """
    table = param_table(self.config)
    keys = jax.random.split(key, len(table))
    flat = {}
    for k, p in zip(keys, table):
      if p.kind in ("kernel", "embedding"):
        flat[p.path] = (stddev * jax.random.normal(k, p.shape, jnp.float32)).astype(dtype)
      elif p.path.endswith("/scale") and not self.config.norm_plus_one:
        flat[p.path] = jnp.ones(p.shape, dtype)
      else:
        flat[p.path] = jnp.zeros(p.shape, dtype)
    return _nest(flat)

  @property
  def layout(self) -> dict[str, KernelLayout]:
    """``{path: jlora.KernelLayout}`` of every linear kernel and the embedding (for ``jlora.init``).

    Kernels stacked over layers have the layer axis as a batch axis; a MoE
    model's routed-expert kernels ``(L, E, in, out)`` have the layer and the
    expert axes as batch axes (one adapter per expert: A ``(L, E, in, r)``,
    B ``(L, E, r, out)``). The router is a stacked linear kernel like the others.

    Example:
      >>> from jlora.models import Decoder, ModelConfig
      >>> cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
      ...   "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4})
      >>> Decoder(cfg).layout["layers/self_attn/q_proj/kernel"]
      KernelLayout(in_axes=(1,), batch_axes=(0,), embedding=False)
    """
    out = {}
    for p in param_table(self.config):
      if p.kind == "embedding":
        out[p.path] = KernelLayout(in_axes=(0,), embedding=True)
      elif p.kind == "kernel" and len(p.shape) == 4:  # routed experts (L, E, in, out)
        out[p.path] = KernelLayout(in_axes=(2,), batch_axes=(0, 1))
      elif p.kind == "kernel":
        out[p.path] = KernelLayout(in_axes=(1,), batch_axes=(0,)) if p.stacked else KernelLayout(in_axes=(0,))
    return out

  def targets(self, spec: str) -> str:
    """A ``--targets`` value -> regex over parameter paths (``jlora._targets.expand_targets``).

    ``"all-linear"``: every projection in the layers (not ``lm_head`` nor the
    embedding, like PEFT), the routed experts included but not a MoE model's
    routers (``router``, ``shared_expert_gate``: PEFT's ``all-linear`` adapts them,
    which changes which experts tokens reach); name them to adapt them.
    ``"q_proj,v_proj"``: those modules (``lm_head`` and ``embed_tokens`` may be
    named too); anything else is returned as a regex.

    Example:
      >>> from jlora.models import Decoder, ModelConfig
      >>> cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
      ...   "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4})
      >>> Decoder(cfg).targets("q_proj,v_proj")
      '.*/(q_proj|v_proj)/kernel'
    """
    layout = self.layout
    if spec == "all-linear":
      layout = {p: lay for p, lay in layout.items() if p.split("/")[-2] not in ROUTERS}
    return expand_targets(spec, layout, model=f"this {self.config.model_type} model")

  @property
  def module_map(self):
    """A ``jlora.peft.ModuleMap`` naming each layer's Hugging Face module (PEFT export/import).

    Example:
      >>> from jlora.models import Decoder, ModelConfig
      >>> cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
      ...   "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4})
      >>> Decoder(cfg).module_map.to_module("layers/self_attn/v_proj/kernel", (1,))
      'model.layers.1.self_attn.v_proj'
    """
    return ModuleMap(to_module=functools.partial(module_name, self.config),
                     tied_embedding="embed_tokens/embedding" if self.config.tie_embeddings else None,
                     # gpt-oss: one 3-D parameter per layer for all experts (PEFT's target_parameters)
                     fused_experts=r"layers/mlp/experts/.*/kernel" if self.config.expert_mlp == "gpt_oss" else None)

  def init_cache(self, batch: int, max_len: int, dtype: Any = jnp.float32) -> Cache:
    """An empty KV cache for ``batch`` rows of up to ``max_len`` tokens (prompt + generated).

    Example:
      >>> from jlora.models import Decoder, ModelConfig
      >>> cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
      ...   "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4})
      >>> Decoder(cfg).init_cache(3, 16)["k"].shape
      (2, 3, 16, 4, 8)
    """
    c = self.config
    shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "mask": jnp.zeros((batch, max_len), bool), "positions": jnp.zeros((batch, max_len), jnp.int32),
            "length": jnp.zeros((), jnp.int32), "next_position": jnp.zeros((batch,), jnp.int32)}

  # -- forward -----------------------------------------------------------------------------

  def __call__(self, params: Params, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
               cache: Cache | None = None, return_router_logits: bool = False):
    """Logits ``(B, T, vocab)`` in the parameters' dtype; ``(logits, new_cache)`` with a cache.

    The same as ``self.head(params)(self.hidden_states(params, input_ids, ...))``, bit for bit.
    With ``return_router_logits`` (MoE models), the router logits of every MoE
    layer come last: ``(logits, router_logits)`` or ``(logits, new_cache,
    router_logits)``, ``router_logits`` of shape ``(L_moe, B, T, E)`` in the
    compute dtype (gpt-oss: with the router bias), for
    ``jlora.models.load_balancing_loss``.

    Args:
      params: the parameter tree (``load`` / ``init``).
      input_ids: ``(B, T)`` token ids.
      attention_mask: ``(B, T)``, 1 for real tokens, 0 for padding (left or right).
      positions: ``(B, T)`` RoPE positions; default: counted over real tokens
        (per segment with ``segment_ids``; continuing the cache with a cache).
      segment_ids: ``(B, T)`` ids of packed examples: a token attends only to
        earlier tokens with the same id (not with a cache).
      cache: from ``init_cache`` or a previous call; the new tokens' keys and
        values are written after the ``cache["length"]`` tokens already there.
      return_router_logits: also return the router logits (MoE models only).
    """
    x, new_cache, router_logits = self._trunk(params, input_ids, attention_mask=attention_mask,
                                              positions=positions, segment_ids=segment_ids, cache=cache,
                                              return_router_logits=return_router_logits)
    logits = self.head(params)(x)
    out = (logits,) if cache is None else (logits, new_cache)
    if return_router_logits:
      out += (router_logits,)
    return out if len(out) > 1 else logits

  def hidden_states(self, params: Params, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
                    positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                    return_router_logits: bool = False):
    """The last hidden states ``(B, T, hidden_size)`` after the final norm: the head's input.

    ``model.head(params)(model.hidden_states(params, ids))`` is ``model(params, ids)``; the
    split lets a loss apply the head in chunks (``jlora.objectives.token_logprobs``) instead of
    materialising ``(B, T, vocab)`` logits. Under ``jlora.wrap`` the layers' adapters apply.

    Args:
      params: the parameter tree (``load`` / ``init``).
      input_ids: ``(B, T)`` token ids.
      attention_mask: ``(B, T)``, 1 for real tokens, 0 for padding.
      positions: ``(B, T)`` RoPE positions (default as in ``__call__``).
      segment_ids: ``(B, T)`` ids of packed examples.
      return_router_logits: also return the router logits ``(L_moe, B, T, E)`` (MoE models
        only), as ``__call__`` does: ``(hidden, router_logits)``.

    Returns:
      ``(B, T, hidden_size)`` in the parameters' dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jlora.models import Decoder, ModelConfig
      >>> cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
      ...   "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4})
      >>> model = Decoder(cfg)
      >>> params = model.init(jax.random.key(0))
      >>> h = model.hidden_states(params, jnp.array([[1, 2, 3]]))
      >>> h.shape, bool((model.head(params)(h) == model(params, jnp.array([[1, 2, 3]]))).all())
      ((1, 3, 32), True)
    """
    x, _, router_logits = self._trunk(params, input_ids, attention_mask=attention_mask, positions=positions,
                                      segment_ids=segment_ids, cache=None, return_router_logits=return_router_logits)
    return (x, router_logits) if return_router_logits else x

  def head(self, params: Params) -> Head:
    """The output projection: ``lm_head`` (``(D, V)``) or the tied embedding table, and the soft-cap.

    No computation happens here; the ``Head`` holds the parameter as it is in ``params``
    (a plain array, or a ``jlora.LoraWeight`` when the head or the tied embedding is adapted).

    Example:
      >>> import jax
      >>> from jlora.models import Decoder, ModelConfig
      >>> cfg = ModelConfig.from_hf({"model_type": "gemma2", "vocab_size": 64, "hidden_size": 32,
      ...   "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 8})
      >>> head = Decoder(cfg).head(Decoder(cfg).init(jax.random.key(0)))
      >>> head.transposed, head.softcap, head.kernel.shape  # Gemma 2: tied embedding, logits capped at 30
      (True, 30.0, (32, 64))
    """
    cfg = self.config
    if cfg.tie_embeddings:
      return Head(params["embed_tokens"]["embedding"], transposed=True, softcap=cfg.final_softcap)
    return Head(params["lm_head"]["kernel"], transposed=False, softcap=cfg.final_softcap)

  def _trunk(self, params: Params, input_ids: jax.Array, *, attention_mask, positions, segment_ids, cache,
             return_router_logits: bool):
    """Embedding, layers and final norm: ``(hidden (B, T, D), new_cache or None, router_logits or None)``."""
    cfg = self.config
    if return_router_logits and not cfg.is_moe:
      raise ValueError(f"return_router_logits: this {cfg.model_type} model has no mixture-of-experts layers.")
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}.")
    b, t = ids.shape
    table = params["embed_tokens"]["embedding"]
    dtype = table.dtype
    x = jnp.take(table, ids, axis=0)
    if cfg.scale_embeddings:
      x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dtype)
    valid = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    if cache is None:
      if positions is None:
        positions = default_positions(b, t, attention_mask=attention_mask, segment_ids=segment_ids)
      q_slots = jnp.arange(t)
      k_slots, k_valid, k_pos = q_slots, valid, positions
      start = None
    else:
      if segment_ids is not None:
        raise ValueError("segment_ids cannot be used with a KV cache (generation runs one example per row).")
      start = cache["length"]
      if positions is None:
        positions = jnp.maximum(cache["next_position"][:, None] + jnp.cumsum(valid.astype(jnp.int32), 1) - 1, 0)
      q_slots = start + jnp.arange(t)
      k_slots = jnp.arange(cache["mask"].shape[1])
      k_valid = lax.dynamic_update_slice(cache["mask"], valid, (0, start))
      k_pos = lax.dynamic_update_slice(cache["positions"], positions.astype(jnp.int32), (0, start))
    positions = jnp.asarray(positions)
    sliding = np.array([lt == "sliding_attention" for lt in cfg.layer_types])
    common = dict(q_slots=q_slots, k_slots=k_slots, k_valid=k_valid, q_positions=positions, k_positions=k_pos,
                  q_segments=segment_ids, k_segments=segment_ids)
    masks = {False: attn_lib.make_mask(window=None, **common) if not sliding.all() else None,
             True: attn_lib.make_mask(window=cfg.sliding_window, **common) if sliding.any() else None}
    tables = {False: rope_lib.cos_sin(positions, *self._frequencies(local=False), dtype)}
    tables[True] = (rope_lib.cos_sin(positions, *self._frequencies(local=True), dtype)
                    if cfg.rope_local is not None and sliding.any() else tables[False])
    mixed = bool(sliding.any() and not sliding.all())

    def pick(options, flag):
      if not mixed:
        return options[bool(sliding[0])]
      return jax.tree.map(lambda a, b_: jnp.where(flag, a, b_), options[True], options[False])

    norm = functools.partial(rms_norm, eps=cfg.norm_eps, plus_one=cfg.norm_plus_one,
                             scale_in_float32=cfg.norm_scale_in_float32)
    dispatch = moe_lib.resolve_dispatch(self.moe_dispatch)

    def layer(x, lp, flag, idx, ck, cv):
      h = norm(x, lp["input_layernorm"]["scale"])
      h, ck, cv = self._attention(h, lp["self_attn"], pick(tables, flag), pick(masks, flag), idx, start, ck, cv)
      if cfg.sandwich_norms:
        h = norm(h, lp["post_attention_layernorm"]["scale"])
        x = x + h
        h = norm(x, lp["pre_feedforward_layernorm"]["scale"])
      else:
        x = x + h
        h = norm(x, lp["post_attention_layernorm"]["scale"])
      m = lp["mlp"]
      router_logits = None
      if "router" in m:  # a mixture-of-experts layer
        h, router_logits = moe_lib.moe_mlp(h, m, cfg, dispatch=dispatch, act=_ACT[cfg.activation])
      else:
        h = _linear(_ACT[cfg.activation](_linear(h, m["gate_proj"])) * _linear(h, m["up_proj"]), m["down_proj"])
      if cfg.sandwich_norms:
        h = norm(h, lp["post_feedforward_layernorm"]["scale"])
      return x + h, ck, cv, router_logits

    if self.remat == "full":
      layer = jax.checkpoint(layer, prevent_cse=False)
    elif self.remat == "dots":
      layer = jax.checkpoint(layer, prevent_cse=False, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

    def body(carry, xs):
      x, ck, cv = carry
      routed = []
      for lp, flag, idx in xs:  # one layer per position of the group's period (one, unless kinds alternate)
        x, ck, cv, r = layer(x, lp, flag, idx, ck, cv)
        if r is not None and return_router_logits:
          routed.append(r)
      return (x, ck, cv), tuple(routed)

    ck = cv = None
    if cache is not None:
      ck, cv = cache["k"], cache["v"]
    # Layers of one kind scan in one group; a MoE model with dense layers runs groups of layers in turn
    # (jlora.models.groups): each position of a group's period gets its layers' slices of the stacks.
    stacked_over = {p.path: p.layer_indices(cfg.num_layers) for p in param_table(cfg) if p.stacked}
    routers = []
    for g in layer_groups(cfg.moe_layers):
      xs = [(group_params(params["layers"], stacked_over, g.layers(j)), jnp.asarray(sliding[g.layers(j)]),
             jnp.asarray(g.layers(j), dtype=jnp.int32)) for j in range(g.period)]
      (x, ck, cv), routed = lax.scan(body, (x, ck, cv), xs, unroll=g.repeats if self.unroll_layers else 1)
      if routed:  # (repeats, MoE layers per period, B, T, E) -> layer order
        routers.append(jnp.stack(routed, axis=1).reshape(-1, *routed[0].shape[1:]))
    x = norm(x, params["norm"]["scale"])
    router_logits = jnp.concatenate(routers, axis=0) if return_router_logits else None
    if cache is None:
      return x, None, router_logits
    last = jnp.max(jnp.where(valid, positions + 1, 0), axis=1)
    new_cache = {"k": ck, "v": cv, "mask": k_valid, "positions": k_pos, "length": start + t,
                 "next_position": jnp.maximum(cache["next_position"], last.astype(jnp.int32))}
    return x, new_cache, router_logits

  def _frequencies(self, *, local: bool) -> tuple[np.ndarray, float]:
    cfg = self.config
    rope = cfg.rope_local if local and cfg.rope_local is not None else cfg.rope
    return rope_lib.inverse_frequencies(rope, cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings)

  def _attention(self, h, a: Params, cos_sin, mask, idx, start, ck, cv):
    cfg = self.config
    b, t, _ = h.shape
    q = _linear(h, a["q_proj"]).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = _linear(h, a["k_proj"]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = _linear(h, a["v_proj"]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
      q = rms_norm(q, a["q_norm"]["scale"], eps=cfg.norm_eps, plus_one=cfg.norm_plus_one)
      k = rms_norm(k, a["k_norm"]["scale"], eps=cfg.norm_eps, plus_one=cfg.norm_plus_one)
    cos, sin = cos_sin
    q, k = rope_lib.apply(q, cos, sin), rope_lib.apply(k, cos, sin)
    if ck is not None:  # write this layer's new keys/values into the cache, attend over all of it
      ck = lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), (idx, 0, start, 0, 0))
      cv = lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), (idx, 0, start, 0, 0))
      k = lax.dynamic_index_in_dim(ck, idx, 0, keepdims=False).astype(q.dtype)
      v = lax.dynamic_index_in_dim(cv, idx, 0, keepdims=False).astype(q.dtype)
    o = attn_lib.attend(q, k, v, mask, scale=cfg.query_scale, softcap=cfg.attn_softcap, sinks=a.get("sinks"),
                        implementation=self.attention)
    return _linear(o.reshape(b, t, cfg.num_heads * cfg.head_dim), a["o_proj"]), ck, cv
