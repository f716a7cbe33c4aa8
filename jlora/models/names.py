"""The parameter table: every native parameter path, its shape and its Hugging Face name.

One table drives loading, saving, random initialisation, kernel layouts and
PEFT module names, so they cannot disagree. Native kernels are ``(in, out)``
and per-layer parameters are stacked along a leading layer axis; Hugging Face
``nn.Linear`` weights are ``(out, in)``, one tensor per layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jlora.models.config import ModelConfig

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
# Mixtral's expert modules: w1 is the gate, w3 up and w2 down (MixtralBlockSparseTop2MLP).
MIXTRAL_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


@dataclasses.dataclass(frozen=True)
class Param:
  """One native parameter: ``path`` (``/``-joined), ``shape``, and its HF tensor name(s)."""

  path: str
  shape: tuple[int, ...]
  # transformers state-dict name; "{i}" stands for the layer index of stacked parameters, "{e}" for
  # the expert index of per-expert tensors.
  hf_name: str
  # "kernel" (a linear kernel), "embedding", "vector" (norm scale, bias, attention sinks).
  kind: str
  stacked: bool
  # The model layers a stacked parameter's slices belong to, in order (None: all layers). A MoE
  # model's dense-MLP and expert parameters cover only their own layers.
  layers: tuple[int, ...] | None = None
  # > 0: one HF tensor per expert ("{e}"), stacked on axis 1 after the layer axis.
  experts: int = 0
  # Kernels: the HF tensor is the transpose of the native slice (torch nn.Linear's (out, in)). False
  # for gpt-oss' 3-D expert parameters, which transformers stores (experts, in, out) as jlora does.
  hf_transposed: bool = True

  def layer_indices(self, num_layers: int) -> tuple[int, ...]:
    """The model layers of the slices of a stacked parameter."""
    return tuple(range(num_layers)) if self.layers is None else self.layers

  def hf_names(self, num_layers: int) -> list[str]:
    """Every HF tensor of this parameter, in the order of its stacked slices (layer-major, then expert)."""
    if not self.stacked:
      return [self.hf_name]
    if self.experts:
      return [self.hf_name.format(i=i, e=e) for i in self.layer_indices(num_layers) for e in range(self.experts)]
    return [self.hf_name.format(i=i) for i in self.layer_indices(num_layers)]

  @property
  def slice_ndim(self) -> int:
    """How many leading axes index HF tensors (layer, and expert for per-expert tensors)."""
    return (1 if self.stacked else 0) + (1 if self.experts else 0)

  @property
  def module(self) -> str:
    """The torch module name (HF name without ``.weight`` / ``.bias``); a 3-D expert parameter's own name."""
    return self.hf_name if not self.hf_transposed else self.hf_name.rsplit(".", 1)[0]


def param_table(cfg: ModelConfig) -> list[Param]:
  """Every parameter of the model described by ``cfg``, in a fixed order.

  Example:
    >>> from jlora.models import ModelConfig
    >>> from jlora.models.names import param_table
    >>> cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
    ...                             "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4})
    >>> [(p.path, p.shape) for p in param_table(cfg)][1]
    ('layers/self_attn/q_proj/kernel', (2, 32, 32))
  """
  L, d, f = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
  q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  out: list[Param] = [Param("embed_tokens/embedding", (cfg.vocab_size, d), "model.embed_tokens.weight",
                            "embedding", False)]

  def layer(path: str, shape: Sequence[int], hf: str, kind: str) -> None:
    out.append(Param(f"layers/{path}", (L, *shape), f"model.layers.{{i}}.{hf}", kind, True))

  proj = {"q_proj": (d, q_out), "k_proj": (d, kv_out), "v_proj": (d, kv_out), "o_proj": (q_out, d)}
  for name, (fan_in, fan_out) in proj.items():
    layer(f"self_attn/{name}/kernel", (fan_in, fan_out), f"self_attn.{name}.weight", "kernel")
    if (cfg.qkv_bias and name != "o_proj") or (cfg.o_bias and name == "o_proj"):
      layer(f"self_attn/{name}/bias", (fan_out,), f"self_attn.{name}.bias", "vector")
  if cfg.qk_norm:
    layer("self_attn/q_norm/scale", (cfg.head_dim,), "self_attn.q_norm.weight", "vector")
    layer("self_attn/k_norm/scale", (cfg.head_dim,), "self_attn.k_norm.weight", "vector")
  if cfg.attention_sinks:
    layer("self_attn/sinks", (cfg.num_heads,), "self_attn.sinks", "vector")
  # The dense MLP, in every layer of a dense model and in the dense layers of a MoE model.
  dense = tuple(i for i, m in enumerate(cfg.moe_layers) if not m)
  sub = None if len(dense) == L else dense
  for name, (fan_in, fan_out) in {"gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}.items():
    if not dense:
      break
    out.append(Param(f"layers/mlp/{name}/kernel", (len(dense), fan_in, fan_out),
                     f"model.layers.{{i}}.mlp.{name}.weight", "kernel", True, sub))
    if cfg.mlp_bias:
      out.append(Param(f"layers/mlp/{name}/bias", (len(dense), fan_out), f"model.layers.{{i}}.mlp.{name}.bias",
                       "vector", True, sub))
  if cfg.is_moe:
    _moe(cfg, out)
  norms = ["input_layernorm", "post_attention_layernorm"]
  if cfg.sandwich_norms:
    norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
  for name in norms:
    layer(f"{name}/scale", (d,), f"{name}.weight", "vector")
  out.append(Param("norm/scale", (d,), "model.norm.weight", "vector", False))
  if not cfg.tie_embeddings:
    out.append(Param("lm_head/kernel", (d, cfg.vocab_size), "lm_head.weight", "kernel", False))
  return out


def _moe(cfg: ModelConfig, out: list[Param]) -> None:
  """The routed experts, router and shared expert of a MoE model's sparse layers (stacked over those)."""
  layers = tuple(i for i, m in enumerate(cfg.moe_layers) if m)
  n, d, E, f = len(layers), cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
  sub = None if n == cfg.num_layers else layers

  def add(path, shape, hf, kind, **kw):
    out.append(Param(f"layers/mlp/{path}", (n, *shape), f"model.layers.{{i}}.{hf}", kind, True, sub, **kw))

  if cfg.expert_mlp == "gpt_oss":  # GptOssMLP: router with bias; 3-D experts stored (E, in, out)
    add("router/kernel", (d, E), "mlp.router.weight", "kernel")
    add("router/bias", (E,), "mlp.router.bias", "vector")
    add("experts/gate_up_proj/kernel", (E, d, 2 * f), "mlp.experts.gate_up_proj", "kernel", hf_transposed=False)
    add("experts/gate_up_proj/bias", (E, 2 * f), "mlp.experts.gate_up_proj_bias", "vector")
    add("experts/down_proj/kernel", (E, f, d), "mlp.experts.down_proj", "kernel", hf_transposed=False)
    add("experts/down_proj/bias", (E, d), "mlp.experts.down_proj_bias", "vector")
    return
  block = "block_sparse_moe" if cfg.model_type == "mixtral" else "mlp"
  add("router/kernel", (d, E), f"{block}.gate.weight", "kernel")
  torch_names = MIXTRAL_EXPERT_NAMES if cfg.model_type == "mixtral" else {k: k for k in MIXTRAL_EXPERT_NAMES}
  for name, (fan_in, fan_out) in {"gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}.items():
    add(f"experts/{name}/kernel", (E, fan_in, fan_out), f"{block}.experts.{{e}}.{torch_names[name]}.weight",
        "kernel", experts=E)
  s = cfg.shared_expert_intermediate_size
  if s:
    for name, (fan_in, fan_out) in {"gate_proj": (d, s), "up_proj": (d, s), "down_proj": (s, d)}.items():
      add(f"shared_expert/{name}/kernel", (fan_in, fan_out), f"mlp.shared_expert.{name}.weight", "kernel")
    add("shared_expert_gate/kernel", (d, 1), "mlp.shared_expert_gate.weight", "kernel")


def module_name(cfg: ModelConfig, path: str, index: Sequence[int]) -> str:
  """The torch module of a native kernel path, given the index of its stacked slice.

  The index is the slice's position along the stacked axes: ``(k,)`` for a
  kernel stacked over layers (``k`` counts the layers the kernel is stacked
  over: all of them, or a MoE model's sparse or dense layers), ``(k, e)`` for a
  routed expert of Mixtral or Qwen (``model.layers.{i}.mlp.experts.{e}.gate_proj``).
  gpt-oss keeps all experts of a layer in one 3-D parameter and has no module per
  expert: its expert kernels take ``(k,)`` and give the parameter's name
  (``model.layers.{i}.mlp.experts.gate_up_proj``, what PEFT's ``target_parameters``
  names).

  Example:
    >>> from jlora.models import ModelConfig
    >>> from jlora.models.names import module_name
    >>> cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
    ...                             "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4})
    >>> module_name(cfg, "layers/mlp/down_proj/kernel", (1,))
    'model.layers.1.mlp.down_proj'
    >>> moe = ModelConfig.from_hf({"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32,
    ...   "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_local_experts": 4})
    >>> module_name(moe, "layers/mlp/experts/gate_proj/kernel", (1, 3))
    'model.layers.1.block_sparse_moe.experts.3.w1'
  """
  table = {p.path: p for p in param_table(cfg)}
  if path not in table or table[path].kind not in ("kernel", "embedding"):
    raise ValueError(f"{path!r} is not a kernel or embedding of this {cfg.model_type} model")
  p = table[path]
  index = tuple(int(i) for i in index)
  if not p.stacked:
    if index:
      raise ValueError(f"{path!r} is not stacked; got index {index}")
    return p.module
  layers = p.layer_indices(cfg.num_layers)
  what = f"{len(layers)} layers" if p.layers is None else f"{len(layers)} layers (model layers {list(layers)})"
  if p.experts:
    if len(index) != 2 or not 0 <= index[0] < len(layers) or not 0 <= index[1] < p.experts:
      raise ValueError(f"{path!r} is stacked over {what} and {p.experts} experts: give (layer, expert), got {index}")
    return p.module.format(i=layers[index[0]], e=index[1])
  if len(index) != 1 or not 0 <= index[0] < len(layers):
    hint = ""
    if len(index) == 2 and not p.hf_transposed:
      hint = (f" {cfg.model_type} stores all experts of a layer in one 3-D parameter, with no module per expert "
              "(PEFT adapts it through target_parameters): give the layer index alone for its name")
    raise ValueError(f"{path!r} is stacked over {what}: give its layer index, got {index}.{hint}".rstrip("."))
  return p.module.format(i=layers[index[0]])
