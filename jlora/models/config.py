"""``ModelConfig``: everything the decoder needs, parsed from a Hugging Face ``config.json``.

One frozen, hashable description covers every supported family; the family
only decides defaults (Gemma's ``(1 + w)`` norms, Qwen2's qkv bias, ...). The
original ``config.json`` is kept verbatim (``hf_config``) so that
``jlora.models.save`` writes back what it read.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
LAYER_TYPES = ("full_attention", "sliding_attention")
# transformers' ACT2FN names -> the decoder's canonical activation.
ACTIVATIONS = {
    "silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
  """Rotary embedding parameters of one attention kind (transformers' ``rope_scaling``).

  Example:
    >>> from jlora.models import RopeConfig
    >>> RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
    ...            high_freq_factor=4.0, original_max_position_embeddings=8192).rope_type
    'llama3'
  """

  # "default", "linear", "llama3" or "yarn".
  rope_type: str = "default"
  # Base wavelength (rope_theta).
  theta: float = 10000.0
  # Context extension factor (linear, llama3, yarn).
  factor: float = 1.0
  # llama3: frequency band edges.
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  # llama3 / yarn: the pretraining context length (yarn: default max_position_embeddings).
  original_max_position_embeddings: int | None = None
  # yarn: cos/sin scale (None: derived from factor, mscale, mscale_all_dim).
  attention_factor: float | None = None
  beta_fast: float | None = None
  beta_slow: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool = True

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}.")
    if not self.theta > 0:
      raise ValueError(f"rope_theta must be > 0, got {self.theta!r}.")
    if self.rope_type != "default" and not self.factor > 0:
      raise ValueError(f"rope_scaling.factor must be > 0 for rope type {self.rope_type!r}, got {self.factor!r}.")
    if self.rope_type == "llama3":
      missing = [k for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                 if getattr(self, k) is None]
      if missing:
        raise ValueError(f"rope_scaling of type 'llama3' needs {', '.join(missing)}.")

  @classmethod
  def from_hf(cls, scaling: Mapping[str, Any] | None, theta: float) -> "RopeConfig":
    """From a ``rope_scaling`` / ``rope_parameters`` dict (or None) and ``rope_theta``."""
    if not scaling:
      return cls(theta=float(theta))
    s = dict(scaling)
    rope_type = s.pop("rope_type", None) or s.pop("type", None) or "default"
    s.pop("type", None)
    theta = s.pop("rope_theta", theta)
    known = {f.name for f in dataclasses.fields(cls)} - {"rope_type", "theta"}
    kwargs = {k: v for k, v in s.items() if k in known and v is not None}
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}.")
    for k in ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast", "beta_slow",
              "mscale", "mscale_all_dim"):
      if k in kwargs:
        kwargs[k] = float(kwargs[k])
    if "original_max_position_embeddings" in kwargs:
      kwargs["original_max_position_embeddings"] = int(kwargs["original_max_position_embeddings"])
    return cls(rope_type=rope_type, theta=float(theta), **kwargs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """A decoder-only transformer, as described by a Hugging Face ``config.json``.

  Build it with ``ModelConfig.from_hf(dict)`` (or ``jlora.models.load``);
  every field is validated.

  Example:
    >>> from jlora.models import ModelConfig
    >>> cfg = ModelConfig.from_hf({"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32,
    ...                             "intermediate_size": 48, "num_hidden_layers": 2,
    ...                             "num_attention_heads": 4, "num_key_value_heads": 2})
    >>> cfg.qkv_bias, cfg.head_dim, cfg.num_kv_heads
    (True, 8, 2)
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  # RMSNorm epsilon.
  norm_eps: float = 1e-6
  # Canonical MLP activation: "silu", "gelu", "gelu_tanh" or "relu".
  activation: str = "silu"
  # The output projection is the input embedding (no lm_head parameter).
  tie_embeddings: bool = False
  # Biases on q/k/v (Qwen2, Llama attention_bias), on o_proj (Llama attention_bias), on the MLP.
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  # RMSNorm of queries and keys over head_dim before RoPE (Qwen3, Gemma 3).
  qk_norm: bool = False
  # Gemma: norms scale by (1 + w) in float32; embeddings are multiplied by sqrt(hidden_size).
  norm_plus_one: bool = False
  scale_embeddings: bool = False
  # Gemma 2/3: extra norms after attention and around the MLP (pre/post "sandwich").
  sandwich_norms: bool = False
  # Attention logits are multiplied by this (1/sqrt(query_pre_attn_scalar or head_dim)).
  query_scale: float = 1.0
  # Soft-capping: cap * tanh(x / cap) on attention logits / final logits; None = off.
  attn_softcap: float | None = None
  final_softcap: float | None = None
  # Window of sliding-attention layers: a query attends to keys less than this many positions back.
  sliding_window: int | None = None
  # "full_attention" or "sliding_attention", one per layer.
  layer_types: tuple[str, ...] = ()
  # RoPE of full-attention layers, and of sliding layers when they differ (Gemma 3 local theta).
  rope: RopeConfig = RopeConfig()
  rope_local: RopeConfig | None = None
  max_position_embeddings: int = 2048
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  # The original config.json as sorted JSON (written back by jlora.models.save).
  hf_config: str = dataclasses.field(default="{}", compare=False, repr=False)

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(_unsupported(self.model_type))
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "max_position_embeddings"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"ModelConfig.{name} must be a positive integer, got {v!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig: num_attention_heads ({self.num_heads}) must be a multiple of "
                       f"num_key_value_heads ({self.num_kv_heads}).")
    if self.activation not in set(ACTIVATIONS.values()):
      raise ValueError(f"ModelConfig.activation {self.activation!r} is not one of {sorted(set(ACTIVATIONS.values()))}.")
    if not self.norm_eps > 0 or not self.query_scale > 0:
      raise ValueError("ModelConfig: norm_eps and query_scale must be > 0.")
    for name in ("attn_softcap", "final_softcap"):
      v = getattr(self, name)
      if v is not None and not v > 0:
        raise ValueError(f"ModelConfig.{name} must be > 0 or None, got {v!r}.")
    types = tuple(self.layer_types) or ("full_attention",) * self.num_layers
    object.__setattr__(self, "layer_types", types)
    if len(types) != self.num_layers or any(t not in LAYER_TYPES for t in types):
      raise ValueError(f"ModelConfig.layer_types must list {self.num_layers} entries from {LAYER_TYPES}, "
                       f"got {list(types)}.")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for rotary embeddings, got {self.head_dim}.")
    if "sliding_attention" in types and (self.sliding_window is None or self.sliding_window < 1):
      raise ValueError(f"ModelConfig: sliding-attention layers need sliding_window >= 1, got {self.sliding_window!r}.")
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    """The end-of-sequence ids (Llama 3 instruct models have several)."""
    e = self.eos_token_id
    return () if e is None else (e,) if isinstance(e, int) else tuple(e)

  def to_hf(self) -> dict[str, Any]:
    """The original ``config.json`` dict (what ``from_hf`` read)."""
    return json.loads(self.hf_config)

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """Parses a transformers ``config.json`` dict (transformers 4.x or 5.x layout).

    Raises:
      ValueError: an unsupported ``model_type`` (the message lists the supported
        ones), an unsupported RoPE type, or inconsistent sizes.
    """
    raw = dict(d)
    mt = raw.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
      raise ValueError(_unsupported(mt))
    d = {**_FAMILY_DEFAULTS.get(mt, {}), **raw}  # what transformers assumes for absent keys
    gemma = mt.startswith("gemma")
    heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    head_dim = d.get("head_dim") or hidden // heads
    layers = int(d["num_hidden_layers"])
    # Gemma 2/3 read hidden_activation, every other family (Gemma 1 included) hidden_act.
    act_key = "hidden_activation" if mt in ("gemma2", "gemma3_text") else "hidden_act"
    act_name = d.get(act_key) or ("gelu_pytorch_tanh" if gemma else "silu")
    if act_name not in ACTIVATIONS:
      raise ValueError(f"config.json: activation {act_name!r} is not supported; supported: {sorted(ACTIVATIONS)}.")
    if float(d.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
      raise ValueError("config.json: partial_rotary_factor != 1 is not supported.")
    attention_bias = bool(d.get("attention_bias", False))
    layer_types = d.get("layer_types")
    window = d.get("sliding_window")
    if mt in ("qwen2", "qwen3"):
      if not d.get("use_sliding_window", False):
        window = None
      if layer_types is None:
        mwl = int(d.get("max_window_layers", layers))
        layer_types = ["sliding_attention" if window is not None and i >= mwl else "full_attention"
                       for i in range(layers)]
    elif mt == "mistral":
      layer_types = ["sliding_attention" if window else "full_attention"] * layers
    elif mt == "gemma2" and layer_types is None:
      layer_types = ["sliding_attention" if not bool(i % 2) else "full_attention" for i in range(layers)]
    elif mt == "gemma3_text" and layer_types is None:
      pattern = int(d.get("sliding_window_pattern", 6))
      layer_types = ["sliding_attention" if bool((i + 1) % pattern) else "full_attention" for i in range(layers)]
    elif layer_types is None:
      layer_types = ["full_attention"] * layers
    if mt in ("llama", "gemma"):
      layer_types = ["full_attention"] * layers
    if "sliding_attention" not in layer_types:
      window = None
    rope, rope_local = _rope_from_hf(d, mt)
    scalar = d.get("query_pre_attn_scalar") if mt in ("gemma2", "gemma3_text") else None
    tie_default = gemma
    return cls(
        model_type=mt, vocab_size=int(d["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]), num_layers=layers, num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads), head_dim=int(head_dim),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)), activation=ACTIVATIONS[act_name],
        tie_embeddings=bool(d.get("tie_word_embeddings", tie_default)),
        qkv_bias=True if mt == "qwen2" else attention_bias,
        o_bias=attention_bias if mt in ("llama", "qwen3", "gemma", "gemma2", "gemma3_text") else False,
        mlp_bias=bool(d.get("mlp_bias", False)) if mt == "llama" else False,
        qk_norm=mt in ("qwen3", "gemma3_text"), norm_plus_one=gemma, scale_embeddings=gemma,
        sandwich_norms=mt in ("gemma2", "gemma3_text"),
        query_scale=float(scalar if scalar is not None else head_dim) ** -0.5,
        attn_softcap=_opt_float(d.get("attn_logit_softcapping")) if mt in ("gemma2", "gemma3_text") else None,
        final_softcap=_opt_float(d.get("final_logit_softcapping")) if mt in ("gemma2", "gemma3_text") else None,
        sliding_window=None if window is None else int(window), layer_types=tuple(layer_types),
        rope=rope, rope_local=rope_local,
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
        hf_config=json.dumps(raw, sort_keys=True),
    )


# transformers' defaults for keys a config.json may omit (families differ).
_GEMMA = {"head_dim": 256, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": 4096},
    "qwen2": {"sliding_window": 4096, "max_window_layers": 28, "use_sliding_window": False},
    "qwen3": {"sliding_window": 4096, "max_window_layers": 28, "use_sliding_window": False, "head_dim": 128},
    "gemma": {**_GEMMA, "hidden_act": "gelu_pytorch_tanh"},
    "gemma2": {**_GEMMA, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
               "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3_text": {**_GEMMA, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
                    "sliding_window": 4096, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0},
}


def _opt_float(v) -> float | None:
  return None if v is None else float(v)


def _rope_from_hf(d: Mapping[str, Any], mt: str) -> tuple[RopeConfig, RopeConfig | None]:
  """(full-attention RoPE, sliding-attention RoPE or None) from either config layout."""
  params = d.get("rope_parameters")  # transformers 5
  theta = d.get("rope_theta", 10000.0)
  if params and set(params) <= set(LAYER_TYPES):  # per layer type (transformers 5 Gemma 3)
    full = RopeConfig.from_hf(params.get("full_attention"), theta)
    local = RopeConfig.from_hf(params["sliding_attention"], theta) if "sliding_attention" in params else None
    return full, local
  full = RopeConfig.from_hf(params if params else d.get("rope_scaling"), theta)
  local = None
  if mt == "gemma3_text":
    local = RopeConfig(theta=float(d.get("rope_local_base_freq", 10000.0)))
  return full, local


def _unsupported(model_type: Any) -> str:
  hint = ""
  if model_type == "gemma3":
    hint = (" This is the multimodal Gemma 3 checkpoint; its text part is a 'gemma3_text' model "
            "(e.g. google/gemma-3-1b-pt, or save Gemma3ForCausalLM).")
  return (f"config.json: model_type {model_type!r} is not supported by jlora.models; supported: "
          f"{', '.join(SUPPORTED_MODEL_TYPES)}.{hint}")
