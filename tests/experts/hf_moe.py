"""transformers 4.57's MoE models, tiny, and their JAX side for the PEFT parity tests.

The JAX side follows jlora.models' conventions (parameters stacked over layers on axis 0,
expert kernels ``[L, E, in, out]``, the router ``[L, H, E]``), so that these tests can be
pointed at ``jlora.models``' MoE families once they exist: replace ``jax_params`` /
``forward`` / ``module_map`` by the model's own. ``forward`` is a full decoder for Mixtral
and Qwen3-MoE (logits); gpt-oss's attention (sinks, YaRN) is not reproduced, so its parity
is checked per MoE block (``gpt_oss_block``) on the inputs the PyTorch model feeds them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from experts.moe_fns import dispatch_sorted
from jlora.peft import ModuleMap

FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss")
# jlora.models' expert kernel names -> transformers 4.57's per-expert modules
MIXTRAL_EXPERTS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def tiny(family: str, seed: int = 0):
  """A tiny float32 PyTorch model (random weights, no top-k ties) and its config."""
  import torch
  import transformers

  common = dict(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                max_position_embeddings=64)
  if family == "qwen3_moe":
    cfg = transformers.Qwen3MoeConfig(**common, head_dim=8, moe_intermediate_size=12, intermediate_size=24,
                                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
  elif family == "mixtral":
    cfg = transformers.MixtralConfig(**common, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2)
  else:
    cfg = transformers.GptOssConfig(**common, head_dim=8, intermediate_size=12, num_local_experts=4,
                                    num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"])
  torch.manual_seed(seed)
  model = {"qwen3_moe": transformers.Qwen3MoeForCausalLM, "mixtral": transformers.MixtralForCausalLM,
           "gpt_oss": transformers.GptOssForCausalLM}[family](cfg).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "sinks" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.3 * torch.randn_like(p))
  return model, cfg


def randomize_lora(model, seed: int = 1, scale: float = 0.3):
  """PEFT's adapters with random non-zero A and B (B = 0 would hide every mapping bug)."""
  import torch

  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(scale * torch.randn_like(p))
  return model


def _np(t):
  return np.asarray(t.detach().float().numpy())


def _stack(sd, fmt, layers, fn=lambda x: x):
  return jnp.asarray(np.stack([fn(_np(sd[fmt.format(i=i)])) for i in range(layers)]))


def jax_params(model, family: str) -> dict:
  """The PyTorch model's weights in jlora.models' stacked layout."""
  cfg = model.config
  sd = model.state_dict()
  L, E = cfg.num_hidden_layers, (cfg.num_experts if family == "qwen3_moe" else cfg.num_local_experts)
  T = lambda x: x.T
  attn = {n: {"kernel": _stack(sd, f"model.layers.{{i}}.self_attn.{n}.weight", L, T)}
          for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
  layers = {"self_attn": attn,
            "input_layernorm": {"weight": _stack(sd, "model.layers.{i}.input_layernorm.weight", L)},
            "post_attention_layernorm": {"weight": _stack(sd, "model.layers.{i}.post_attention_layernorm.weight", L)}}
  if family == "qwen3_moe":
    for n in ("q_norm", "k_norm"):
      attn[n] = {"weight": _stack(sd, f"model.layers.{{i}}.self_attn.{n}.weight", L)}
  if family == "gpt_oss":
    layers["mlp"] = {
        "router": {"kernel": _stack(sd, "model.layers.{i}.mlp.router.weight", L, T),
                   "bias": _stack(sd, "model.layers.{i}.mlp.router.bias", L)},
        "experts": {n: {"kernel": _stack(sd, f"model.layers.{{i}}.mlp.experts.{n}", L),
                        "bias": _stack(sd, f"model.layers.{{i}}.mlp.experts.{n}_bias", L)}
                    for n in ("gate_up_proj", "down_proj")}}
  else:
    block = "mlp" if family == "qwen3_moe" else "block_sparse_moe"
    names = MIXTRAL_EXPERTS if family == "mixtral" else {n: n for n in MIXTRAL_EXPERTS}
    experts = {}
    for n, torch_name in names.items():
      experts[n] = {"kernel": jnp.asarray(np.stack([np.stack(
          [_np(sd[f"model.layers.{i}.{block}.experts.{e}.{torch_name}.weight"]).T for e in range(E)])
          for i in range(L)]))}
    layers["mlp"] = {"router": {"kernel": _stack(sd, f"model.layers.{{i}}.{block}.gate.weight", L, T)},
                     "experts": experts}
  return {"embed_tokens": {"embedding": jnp.asarray(_np(sd["model.embed_tokens.weight"]))}, "layers": layers,
          "norm": {"weight": jnp.asarray(_np(sd["model.norm.weight"]))},
          "lm_head": {"kernel": jnp.asarray(_np(sd["lm_head.weight"]).T)}}


def layout(params) -> dict:
  """Expert kernels ``[L, E, in, out]``; every other stacked kernel ``[L, in, out]``."""
  out = {}
  for path, leaf in jlora._tree.leaves_with_paths(params):
    if path.endswith("/kernel") and path.startswith("layers/"):
      out[path] = (jlora.KernelLayout(batch_axes=(0, 1), in_axes=(2,)) if "/experts/" in path
                   else jlora.KernelLayout(batch_axes=(0,), in_axes=(1,)))
  return out


def module_map(family: str) -> ModuleMap:
  """Flax paths -> transformers 4.57's module (or, for gpt-oss's fused experts, parameter) names."""
  block = {"qwen3_moe": "mlp", "mixtral": "block_sparse_moe", "gpt_oss": "mlp"}[family]

  def to_module(path: str, idx) -> str:
    parts = path.split("/")
    if parts[0] != "layers" or parts[-1] != "kernel":
      return ".".join(parts[:-1])
    i = idx[0]
    if parts[1] == "self_attn":
      return f"model.layers.{i}.self_attn.{parts[2]}"
    if parts[2] == "router":
      return f"model.layers.{i}.{block}.{'router' if family == 'gpt_oss' else 'gate'}"
    if family == "gpt_oss":  # one 3-D parameter per layer: idx = (layer,)
      return f"model.layers.{i}.mlp.experts.{parts[3]}"
    name = MIXTRAL_EXPERTS[parts[3]] if family == "mixtral" else parts[3]
    return f"model.layers.{i}.{block}.experts.{idx[1]}.{name}"

  return ModuleMap(to_module=to_module, fused_experts=r"layers/mlp/experts/.*/kernel" if family == "gpt_oss" else None)


# -- the JAX side ---------------------------------------------------------------------------------


def _rms(x, w, eps):
  x32 = x.astype(jnp.float32)
  return w * (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype)


def _rope(x, theta):  # x [B, S, heads, hd]; transformers' rotate_half form
  hd = x.shape[-1]
  inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
  ang = np.arange(x.shape[1], dtype=np.float32)[:, None] * inv[None]
  cos, sin = [jnp.asarray(np.concatenate([f(ang)] * 2, -1))[None, :, None] for f in (np.cos, np.sin)]
  x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
  return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def experts_sorted(x, mlp, top_k, renormalize):
  """Routed experts by sorted dispatch: softmax in float32, top-k, ``ragged_dot`` per projection."""
  probs = jax.nn.softmax((x @ mlp["router"]["kernel"]).astype(jnp.float32), axis=-1)
  w, idx = jax.lax.top_k(probs, top_k)
  if renormalize:
    w = w / w.sum(-1, keepdims=True)
  return dispatch_sorted(x, mlp["experts"], w.astype(x.dtype), idx)


def forward(params, ids, cfg):
  """Logits of a Mixtral or Qwen3-MoE decoder (causal, default RoPE), layers under ``lax.scan``."""
  b, s = ids.shape
  qwen3 = cfg.model_type == "qwen3_moe"
  hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
  nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
  eps = cfg.rms_norm_eps
  mask = jnp.tril(jnp.ones((s, s), bool))

  def layer(h, p):
    a = p["self_attn"]
    x = _rms(h, p["input_layernorm"]["weight"], eps)
    q = (x @ a["q_proj"]["kernel"]).reshape(b, s, nh, hd)
    k = (x @ a["k_proj"]["kernel"]).reshape(b, s, nkv, hd)
    v = (x @ a["v_proj"]["kernel"]).reshape(b, s, nkv, hd)
    if qwen3:
      q, k = _rms(q, a["q_norm"]["weight"], eps), _rms(k, a["k_norm"]["weight"], eps)
    q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
    k, v = jnp.repeat(k, nh // nkv, axis=2), jnp.repeat(v, nh // nkv, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * hd ** -0.5
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf).astype(jnp.float32), axis=-1)
    h = h + jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, nh * hd) @ a["o_proj"]["kernel"]
    x = _rms(h, p["post_attention_layernorm"]["weight"], eps).reshape(b * s, -1)
    renorm = cfg.norm_topk_prob if qwen3 else True
    return h + experts_sorted(x, p["mlp"], cfg.num_experts_per_tok, renorm).reshape(b, s, -1), None

  h, _ = jax.lax.scan(layer, params["embed_tokens"]["embedding"][ids], params["layers"])
  return _rms(h, params["norm"]["weight"], eps) @ params["lm_head"]["kernel"]


def gpt_oss_block(mlp, x, cfg):
  """gpt-oss's MoE block (router with bias, top-k of the logits then softmax, interleaved clamped GLU
  with biases) by sorted dispatch: ``x`` ``[T, H]`` -> ``[T, H]``."""
  e = mlp["experts"]
  top_k, num = cfg.num_experts_per_tok, cfg.num_local_experts
  logits = x @ mlp["router"]["kernel"] + mlp["router"]["bias"]
  v, idx = jax.lax.top_k(logits, top_k)
  w = jax.nn.softmax(v, axis=-1)
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  expert = flat[order]
  xs = x[order // top_k]
  sizes = jnp.bincount(flat, length=num).astype(jnp.int32)
  gate_up = jax.lax.ragged_dot(xs, e["gate_up_proj"]["kernel"], sizes) + e["gate_up_proj"]["bias"][expert]
  gate, up = jnp.minimum(gate_up[:, ::2], 7.0), jnp.clip(gate_up[:, 1::2], -7.0, 7.0)
  h = (up + 1) * gate * jax.nn.sigmoid(gate * 1.702)
  ys = jax.lax.ragged_dot(h, e["down_proj"]["kernel"], sizes) + e["down_proj"]["bias"][expert]
  y = ys[jnp.argsort(order)].reshape(x.shape[0], top_k, -1)
  return jnp.einsum("tkh,tk->th", y, w)


def gpt_oss_blocks(params, xs, cfg):
  """Every layer's MoE block on its own input ``xs[i]`` ``[T, H]`` (scanned): ``[L, T, H]``."""
  def one(_, p_x):
    p, x = p_x
    return None, gpt_oss_block(p, x, cfg)

  return jax.lax.scan(one, None, (params["layers"]["mlp"], xs))[1]


def mlp_io(model, ids, family: str):
  """Each layer's MoE block input and (routed) output in the PyTorch model: ``[L, T, H]`` each."""
  import torch

  block = "block_sparse_moe" if family == "mixtral" else "mlp"
  ins, outs, hooks = [], [], []
  base = model.get_base_model() if hasattr(model, "get_base_model") else model

  def record(module, args, out):  # (returns None: the output stays)
    ins.append(_np(args[0]).reshape(-1, args[0].shape[-1]))
    outs.append(_np(out[0] if isinstance(out, tuple) else out).reshape(-1, args[0].shape[-1]))

  for layer in base.model.layers:
    hooks.append(getattr(layer, block).register_forward_hook(record))
  with torch.no_grad():
    logits = _np(model(torch.as_tensor(np.asarray(ids))).logits)
  for h in hooks:
    h.remove()
  return np.stack(ins), np.stack(outs), logits
