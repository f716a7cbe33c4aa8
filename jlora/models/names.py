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


@dataclasses.dataclass(frozen=True)
class Param:
  """One native parameter: ``path`` (``/``-joined), ``shape``, and its HF tensor name."""

  path: str
  shape: tuple[int, ...]
  # transformers state-dict name; "{i}" stands for the layer index of stacked parameters.
  hf_name: str
  # "kernel" (transposed to/from torch), "embedding", "vector" (norm scale or bias).
  kind: str
  stacked: bool

  def hf_names(self, num_layers: int) -> list[str]:
    return [self.hf_name.format(i=i) for i in range(num_layers)] if self.stacked else [self.hf_name]

  @property
  def module(self) -> str:
    """The torch module name (HF name without ``.weight`` / ``.bias``)."""
    return self.hf_name.rsplit(".", 1)[0]


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
  for name, (fan_in, fan_out) in {"gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}.items():
    layer(f"mlp/{name}/kernel", (fan_in, fan_out), f"mlp.{name}.weight", "kernel")
    if cfg.mlp_bias:
      layer(f"mlp/{name}/bias", (fan_out,), f"mlp.{name}.bias", "vector")
  norms = ["input_layernorm", "post_attention_layernorm"]
  if cfg.sandwich_norms:
    norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
  for name in norms:
    layer(f"{name}/scale", (d,), f"{name}.weight", "vector")
  out.append(Param("norm/scale", (d,), "model.norm.weight", "vector", False))
  if not cfg.tie_embeddings:
    out.append(Param("lm_head/kernel", (d, cfg.vocab_size), "lm_head.weight", "kernel", False))
  return out


def module_name(cfg: ModelConfig, path: str, index: Sequence[int]) -> str:
  """The torch module of a native kernel path (and layer index for stacked ones).

  Example:
    >>> from jlora.models import ModelConfig
    >>> from jlora.models.names import module_name
    >>> cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
    ...                             "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4})
    >>> module_name(cfg, "layers/mlp/down_proj/kernel", (1,))
    'model.layers.1.mlp.down_proj'
  """
  table = {p.path: p for p in param_table(cfg)}
  if path not in table or table[path].kind not in ("kernel", "embedding"):
    raise ValueError(f"{path!r} is not a kernel or embedding of this {cfg.model_type} model")
  p = table[path]
  if p.stacked:
    if len(index) != 1 or not 0 <= int(index[0]) < cfg.num_layers:
      raise ValueError(f"{path!r} is stacked over {cfg.num_layers} layers: give its layer index, got {tuple(index)}")
    return p.module.format(i=int(index[0]))
  if tuple(index):
    raise ValueError(f"{path!r} is not stacked; got index {tuple(index)}")
  return p.module
