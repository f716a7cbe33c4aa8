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

# Mixture-of-experts families: routed experts in every (Qwen: every sparse) layer.
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", *MOE_MODEL_TYPES)
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
LAYER_TYPES = ("full_attention", "sliding_attention")
# How router logits become each token's experts and weights (see ModelConfig.routing).
ROUTINGS = ("softmax_topk", "topk_softmax")
# The routed experts' MLP (see ModelConfig.expert_mlp).
EXPERT_MLPS = ("swiglu", "gpt_oss")
# The config.json key that holds the number of routed experts, per family (for error messages).
EXPERTS_KEY = {"mixtral": "num_local_experts", "gpt_oss": "num_local_experts", "qwen2_moe": "num_experts",
               "qwen3_moe": "num_experts"}
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
  # -- mixture of experts (num_experts = 0: a dense model) --
  # Routed experts per MoE layer, and how many of them each token uses (top-k).
  num_experts: int = 0
  num_experts_per_tok: int = 0
  # Width of each routed expert's MLP (intermediate_size is the width of the dense layers' MLP).
  moe_intermediate_size: int = 0
  # One per layer: True where the layer's MLP is the routed experts, False where it is the dense MLP
  # (Qwen's decoder_sparse_step / mlp_only_layers). Empty for dense models.
  moe_layers: tuple[bool, ...] = ()
  # "softmax_topk": softmax over all experts in float32, then the top k (Mixtral, Qwen);
  # "topk_softmax": the top k logits, then a softmax over those in the logits' dtype (gpt-oss).
  routing: str = "softmax_topk"
  # softmax_topk: divide the top-k weights by their sum (Mixtral always; Qwen's norm_topk_prob).
  norm_topk_prob: bool = False
  # The router has a bias (gpt-oss).
  router_bias: bool = False
  # "swiglu": down(act(gate x) * up x) without biases (Mixtral, Qwen); "gpt_oss": one fused gate_up
  # projection (columns interleaved gate, up) with biases and the clamped SwiGLU, then down with a bias.
  expert_mlp: str = "swiglu"
  # Qwen2-MoE: width of the shared expert, added to every token as sigmoid(x . w) * shared(x); 0 = none.
  shared_expert_intermediate_size: int = 0
  # transformers' router_aux_loss_coef (the weight of the load-balancing loss in its training loss).
  router_aux_loss_coef: float = 0.0
  # gpt-oss: each attention head has a learned logit (a "sink") that joins the softmax and is dropped.
  attention_sinks: bool = False
  # gpt-oss: RMSNorm multiplies by its weight in float32, then casts (Llama casts first).
  norm_scale_in_float32: bool = False
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
    self._check_moe()

  def _check_moe(self) -> None:
    moe_layers = tuple(bool(m) for m in self.moe_layers) or (self.num_experts > 0,) * self.num_layers
    object.__setattr__(self, "moe_layers", moe_layers)
    if len(moe_layers) != self.num_layers:
      raise ValueError(f"ModelConfig.moe_layers must have one entry per layer ({self.num_layers}), "
                       f"got {len(moe_layers)}.")
    if self.num_experts == 0:
      if any(moe_layers):
        raise ValueError("ModelConfig.moe_layers marks MoE layers but num_experts is 0.")
      return
    experts_key = EXPERTS_KEY.get(self.model_type, "num_experts")
    for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        key = experts_key if name == "num_experts" else name
        raise ValueError(f"config.json: {key} must be a positive integer in a mixture-of-experts model, got {v!r}.")
    if self.num_experts_per_tok > self.num_experts:
      raise ValueError(f"config.json: num_experts_per_tok ({self.num_experts_per_tok}) is larger than "
                       f"{experts_key} ({self.num_experts}): each token is routed to num_experts_per_tok "
                       f"distinct experts out of {experts_key}.")
    if self.routing not in ROUTINGS:
      raise ValueError(f"ModelConfig.routing must be one of {ROUTINGS}, got {self.routing!r}.")
    if self.expert_mlp not in EXPERT_MLPS:
      raise ValueError(f"ModelConfig.expert_mlp must be one of {EXPERT_MLPS}, got {self.expert_mlp!r}.")
    if self.shared_expert_intermediate_size < 0:
      raise ValueError("ModelConfig.shared_expert_intermediate_size must be >= 0.")

  @property
  def is_moe(self) -> bool:
    """Whether any layer routes its tokens to experts."""
    return any(self.moe_layers)

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
    elif mt in ("mistral", "mixtral"):
      layer_types = ["sliding_attention" if window else "full_attention"] * layers
    elif mt in ("qwen2_moe", "qwen3_moe"):
      # transformers 4.57.6 builds one sliding-window mask for every layer when use_sliding_window is set.
      window = window if d.get("use_sliding_window", False) else None
      if mt == "qwen2_moe" and window is not None:
        raise ValueError("config.json: use_sliding_window with qwen2_moe is not supported: transformers 4.57.6 "
                         "windows every layer in its eager/SDPA attention but only layers >= max_window_layers "
                         "with flash attention, so the model has no single meaning. Set use_sliding_window: false "
                         "(as every released Qwen2-MoE checkpoint does).")
      layer_types = ["sliding_attention" if window else "full_attention"] * layers
    elif mt == "gpt_oss" and layer_types is None:
      layer_types = ["sliding_attention" if bool((i + 1) % 2) else "full_attention" for i in range(layers)]
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
    moe = _moe_from_hf(d, mt, layers) if mt in MOE_MODEL_TYPES else {}
    scalar = d.get("query_pre_attn_scalar") if mt in ("gemma2", "gemma3_text") else None
    tie_default = gemma
    return cls(
        model_type=mt, vocab_size=int(d["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]), num_layers=layers, num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads), head_dim=int(head_dim),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)), activation=ACTIVATIONS[act_name],
        tie_embeddings=bool(d.get("tie_word_embeddings", tie_default)),
        qkv_bias=(True if mt in ("qwen2", "gpt_oss") else bool(d.get("qkv_bias", True)) if mt == "qwen2_moe"
                  else attention_bias),
        o_bias=(True if mt == "gpt_oss" else
                attention_bias if mt in ("llama", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text") else False),
        mlp_bias=bool(d.get("mlp_bias", False)) if mt == "llama" else False,
        qk_norm=mt in ("qwen3", "qwen3_moe", "gemma3_text"), norm_plus_one=gemma, scale_embeddings=gemma,
        sandwich_norms=mt in ("gemma2", "gemma3_text"),
        query_scale=float(scalar if scalar is not None else head_dim) ** -0.5,
        attn_softcap=_opt_float(d.get("attn_logit_softcapping")) if mt in ("gemma2", "gemma3_text") else None,
        final_softcap=_opt_float(d.get("final_logit_softcapping")) if mt in ("gemma2", "gemma3_text") else None,
        sliding_window=None if window is None else int(window), layer_types=tuple(layer_types),
        rope=rope, rope_local=rope_local,
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
        hf_config=json.dumps(raw, sort_keys=True), **moe,
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

# Mixture-of-experts families (transformers 4.57.6 configuration_<family>.py defaults).
_FAMILY_DEFAULTS.update({
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                "sliding_window": None, "router_aux_loss_coef": 0.001, "max_position_embeddings": 4096 * 32},
    "qwen2_moe": {"num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                  "shared_expert_intermediate_size": 5632, "norm_topk_prob": False, "decoder_sparse_step": 1,
                  "mlp_only_layers": [], "qkv_bias": True, "use_sliding_window": False, "sliding_window": 4096,
                  "router_aux_loss_coef": 0.001, "max_position_embeddings": 32768},
    "qwen3_moe": {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                  "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "use_sliding_window": False, "sliding_window": 4096, "router_aux_loss_coef": 0.001,
                  "max_position_embeddings": 32768},
    "gpt_oss": {"num_local_experts": 128, "num_experts_per_tok": 4, "head_dim": 64, "sliding_window": 128,
                "rope_theta": 150000.0, "rms_norm_eps": 1e-5, "router_aux_loss_coef": 0.9,
                "max_position_embeddings": 131072, "intermediate_size": 2880,
                "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "truncate": False, "original_max_position_embeddings": 4096}},
})


def _moe_from_hf(d: Mapping[str, Any], mt: str, layers: int) -> dict[str, Any]:
  """The mixture-of-experts fields of ``ModelConfig`` from a MoE family's ``config.json``."""
  experts_key = EXPERTS_KEY[mt]
  num_experts = int(d.get(experts_key) or 0)
  if mt in ("qwen2_moe", "qwen3_moe"):  # Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer
    step = int(d.get("decoder_sparse_step") or 1)
    dense = {int(i) for i in d.get("mlp_only_layers") or ()}
    moe_layers = [i not in dense and num_experts > 0 and (i + 1) % step == 0 for i in range(layers)]
  else:
    moe_layers = [num_experts > 0] * layers
  if not any(moe_layers):
    num_experts = 0
  gpt_oss = mt == "gpt_oss"
  width = d.get("moe_intermediate_size") if mt in ("qwen2_moe", "qwen3_moe") else d.get("intermediate_size")
  return dict(
      num_experts=num_experts, num_experts_per_tok=int(d.get("num_experts_per_tok") or 0) if num_experts else 0,
      moe_intermediate_size=int(width or 0) if num_experts else 0, moe_layers=tuple(moe_layers),
      routing="topk_softmax" if gpt_oss else "softmax_topk",
      norm_topk_prob=True if mt == "mixtral" else bool(d.get("norm_topk_prob", False)),
      router_bias=gpt_oss, expert_mlp="gpt_oss" if gpt_oss else "swiglu",
      shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0) if mt == "qwen2_moe" else 0,
      router_aux_loss_coef=float(d.get("router_aux_loss_coef") or 0.0),
      attention_sinks=gpt_oss, norm_scale_in_float32=gpt_oss,
  )


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
