"""Expert LoRA (LoRA on routed experts) train step vs its floor, experts frozen and PEFT on PyTorch.

A Qwen3-MoE-shaped decoder (16 experts, top-4, 2 layers, d=256, expert width 128, vocab 1024;
batch 4 x 128 tokens) written in JAX the way MaxText and tunix write theirs: the router's top-k,
the token rows sorted by expert, one ``jax.lax.ragged_dot`` per expert projection, unsorted. The
weights are those of transformers' ``Qwen3MoeForCausalLM`` at the same config, so the PyTorch
peer (PEFT 0.21 on transformers' per-expert loop) trains the same model. LoRA r=8 on attention
(q/k/v/o) and the routed experts (gate/up/down), never the router.

Steps (loss + gradient + AdamW, jitted, donated):

  floor                  the backward pass with every activation gradient and no weight gradient
                         (the gradient of the input-norm weights only): no LoRA step can cost less
  jlora                  expert LoRA with jlora's custom VJP (the CPU default of jlora.wrap)
  jlora_autodiff         the same low-rank path under plain autodiff (fused_expansion=False)
  jlora_experts_frozen   attention adapters only, the experts frozen
  full                   full fine-tuning (its expert gradients are per-expert dW: the contrast)
  peft_lora              PEFT on PyTorch, same targets (transformers' loop over experts)
  torch_floor            PyTorch's floor (the input-norm weights' gradient only)

Reported: XLA's FLOPs and temp memory of each compiled step against the floor's; the buffers of
each compiled program that have an expert kernel's shape [E, in, out] (a per-expert dW or B·A would
be one); wall time, interleaved medians, side by side in one run. On CPU, XLA lowers ``ragged_dot``
to a masked dense product over every expert (E x the FLOPs of a grouped kernel, jax 0.10), which
the floor pays too: the ratios to the floor and to the frozen-experts step are the numbers that carry
over to accelerators, the seconds against PEFT's per-expert loop are this CPU's.

  python benchmarks/expert_lora.py                # everything, 6 timed rounds
  python benchmarks/expert_lora.py --quick        # XLA cost, memory and buffers only
  python benchmarks/expert_lora.py --smoke        # tiny model, one round: does it still run?

Results go to benchmarks/results/expert_lora.json (expert_lora_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from _common import (add_smoke_flag, compiled_costs, donating_runner, interleaved_times, median, rounds_of,
                     write_result)
from jlora._targets import expand_targets

warnings.filterwarnings("ignore")

# Qwen3-30B-A3B's proportions (hidden / expert width 2048 / 768, GQA 8:1... here 4:1), scaled to this CPU.
QWEN3_MOE = dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                 moe_intermediate_size=384, intermediate_size=1024, num_experts=16, num_experts_per_tok=4,
                 norm_topk_prob=True, vocab_size=1024, max_position_embeddings=512)
BATCH, SEQ = 2, 64
# (sizes that no other array of the step shares, so the buffer count below means the same as at full size)
SMOKE = dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=12,
             moe_intermediate_size=20, intermediate_size=32, num_experts=4, num_experts_per_tok=2,
             norm_topk_prob=True, vocab_size=64, max_position_embeddings=64)
SMOKE_BATCH, SMOKE_SEQ = 2, 8
RANK, ALPHA = 8, 16
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- the model: transformers' Qwen3-MoE weights, a sorted-dispatch JAX forward -------------------------


def torch_model(config: dict):
  import torch
  import transformers

  torch.manual_seed(0)
  return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**config)).float()


def jax_params(model) -> dict:
  """The PyTorch model's weights stacked over layers: experts [L, E, in, out], the router [L, H, E]."""
  c = model.config
  sd = {k: np.asarray(v.detach().float().numpy()) for k, v in model.state_dict().items()}
  L, E = c.num_hidden_layers, c.num_experts
  stack = lambda fmt, f=lambda x: x: jnp.asarray(np.stack([f(sd[fmt.format(i=i)]) for i in range(L)]))
  attn = {n: {"kernel": stack(f"model.layers.{{i}}.self_attn.{n}.weight", np.transpose)}
          for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
  attn.update({n: {"weight": stack(f"model.layers.{{i}}.self_attn.{n}.weight")} for n in ("q_norm", "k_norm")})
  experts = {n: {"kernel": jnp.asarray(np.stack([np.stack([sd[f"model.layers.{i}.mlp.experts.{e}.{n}.weight"].T
                                                           for e in range(E)]) for i in range(L)]))}
             for n in ("gate_proj", "up_proj", "down_proj")}
  layers = {"self_attn": attn, "mlp": {"router": {"kernel": stack("model.layers.{i}.mlp.gate.weight", np.transpose)},
                                       "experts": experts},
            "input_layernorm": {"weight": stack("model.layers.{i}.input_layernorm.weight")},
            "post_attention_layernorm": {"weight": stack("model.layers.{i}.post_attention_layernorm.weight")}}
  return {"embed_tokens": {"embedding": jnp.asarray(sd["model.embed_tokens.weight"])}, "layers": layers,
          "norm": {"weight": jnp.asarray(sd["model.norm.weight"])}, "lm_head": {"kernel": jnp.asarray(sd["lm_head.weight"].T)}}


def layout(params) -> dict:
  return {p: (jlora.KernelLayout(batch_axes=(0, 1), in_axes=(2,)) if "/experts/" in p
              else jlora.KernelLayout(batch_axes=(0,), in_axes=(1,)))
          for p, _ in jlora._tree.leaves_with_paths(params) if p.startswith("layers/") and p.endswith("/kernel")}


def _rms(x, w, eps=1e-6):
  return w * (x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps))


def _rope(x, theta=10000.0):
  hd = x.shape[-1]
  inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
  ang = np.arange(x.shape[1], dtype=np.float32)[:, None] * inv[None]
  cos, sin = [jnp.asarray(np.concatenate([f(ang)] * 2, -1))[None, :, None] for f in (np.cos, np.sin)]
  return x * cos + jnp.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin


def moe(x, mlp, top_k):
  """Routed experts by sorted dispatch (MaxText/tunix style): top-k, sort rows by expert, ragged_dot."""
  e = mlp["experts"]
  probs = jax.nn.softmax(x @ mlp["router"]["kernel"], axis=-1)
  w, idx = jax.lax.top_k(probs, top_k)
  w = w / w.sum(-1, keepdims=True)
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  xs = x[order // top_k]
  sizes = jnp.bincount(flat, length=e["gate_proj"]["kernel"].shape[0]).astype(jnp.int32)
  h = jax.nn.silu(jax.lax.ragged_dot(xs, e["gate_proj"]["kernel"], sizes)) * jax.lax.ragged_dot(
      xs, e["up_proj"]["kernel"], sizes)
  ys = jax.lax.ragged_dot(h, e["down_proj"]["kernel"], sizes)
  return jnp.einsum("tkh,tk->th", ys[jnp.argsort(order)].reshape(x.shape[0], top_k, -1), w)


def forward(params, ids, config):
  b, s = ids.shape
  nh, nkv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
  causal = jnp.tril(jnp.ones((s, s), bool))

  def layer(h, p):
    a = p["self_attn"]
    x = _rms(h, p["input_layernorm"]["weight"])
    q = _rope(_rms((x @ a["q_proj"]["kernel"]).reshape(b, s, nh, hd), a["q_norm"]["weight"]))
    k = _rope(_rms((x @ a["k_proj"]["kernel"]).reshape(b, s, nkv, hd), a["k_norm"]["weight"]))
    v = (x @ a["v_proj"]["kernel"]).reshape(b, s, nkv, hd)
    k, v = jnp.repeat(k, nh // nkv, axis=2), jnp.repeat(v, nh // nkv, axis=2)
    att = jax.nn.softmax(jnp.where(causal, jnp.einsum("bqhd,bkhd->bhqk", q, k) * hd ** -0.5, -jnp.inf), axis=-1)
    h = h + jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, s, nh * hd) @ a["o_proj"]["kernel"]
    x = _rms(h, p["post_attention_layernorm"]["weight"]).reshape(b * s, -1)
    return h + moe(x, p["mlp"], config["num_experts_per_tok"]).reshape(b, s, -1), None

  h, _ = jax.lax.scan(layer, params["embed_tokens"]["embedding"][ids], params["layers"])
  return _rms(h, params["norm"]["weight"]) @ params["lm_head"]["kernel"]


def lm_loss(logits, ids):
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


# -- the steps -----------------------------------------------------------------------------------------


def jax_steps(config: dict, params, ids):
  fwd = functools.partial(forward, config=config)
  tx = optax.adamw(1e-4, weight_decay=0.01)
  lay = layout(params)
  every = expand_targets("all-linear", lay)  # attention + routed experts, never the router
  attention = r"layers/self_attn/(q|k|v|o)_proj/kernel"

  def lora(targets, lowering):
    lp = jlora.init(jax.random.key(1), params, jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=targets), layout=lay)
    adapters, frozen = jlora.split(jax.tree.map(jnp.copy, lp, is_leaf=lambda x: x is None))
    ltx = jlora.optimizer(tx, adapters)
    wrapped = jlora.wrap(fwd, fused_expansion=lowering)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(adapters, opt_state, frozen, ids):
      loss, g = jax.value_and_grad(lambda a: lm_loss(wrapped(jlora.combine(a, frozen), ids), ids))(adapters)
      u, opt_state = ltx.update(g, opt_state, adapters)
      return optax.apply_updates(adapters, u), opt_state, loss

    return (step, (adapters, ltx.init(adapters), frozen, ids)), lp

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def full_step(p, opt_state, ids):
    loss, g = jax.value_and_grad(lambda q: lm_loss(fwd(q, ids), ids))(p)
    u, opt_state = tx.update(g, opt_state, p)
    return optax.apply_updates(p, u), opt_state, loss

  @jax.jit
  def floor(p, ids):
    def loss(norms):
      q = {**p, "layers": {**p["layers"], "input_layernorm": {"weight": norms}}}
      return lm_loss(fwd(q, ids), ids)
    return jax.grad(loss)(p["layers"]["input_layernorm"]["weight"])

  jl, lp = lora(every, None)
  full_params = jax.tree.map(jnp.copy, params)
  steps = {"floor": (floor, (params, ids)), "jlora": jl, "jlora_autodiff": lora(every, False)[0],
           "jlora_experts_frozen": lora(attention, None)[0],
           "full": (full_step, (full_params, tx.init(full_params), ids))}
  return steps, lp


def xla_costs(step, args, kernel_shapes) -> dict:
  """FLOPs, temp memory and expert-kernel-shaped buffers of the compiled step."""
  compiled = step.lower(*args).compile()
  costs = compiled_costs(compiled)
  return {**{k: costs[k] for k in ("flops", "temp_bytes", "argument_bytes", "output_bytes")},
          "expert_kernel_shaped_buffers": kernel_buffers(compiled.as_text(), kernel_shapes)}


def kernel_buffers(hlo: str, kernel_shapes) -> dict:
  """Instructions of the optimized HLO whose result has an expert kernel's shape (one layer's [E, in, out]
  or [E, out, in], or all layers'), by opcode: the program's parameters (the frozen kernels themselves)
  and, apart, anything computed in that shape (a per-expert dW, or a merged W0 + B·A, would be)."""
  shapes = set()
  for s in kernel_shapes:
    shapes |= {tuple(s), tuple(s[1:]), (s[1], s[3], s[2]), (s[0], s[1], s[3], s[2])}
  counts: dict[str, int] = {}
  pattern = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*[a-z0-9]+\[([\d,]*)\][^ ]*\s+([a-z\-]+)\(")
  for line in hlo.splitlines():
    m = pattern.match(line)
    if not m:
      continue
    dims = tuple(int(d) for d in m.group(1).split(",") if d)
    if dims in shapes:
      op = m.group(2)
      kind = "parameter" if op == "parameter" else (
          "view of a kernel" if op in ("bitcast", "get-tuple-element", "tuple", "copy", "dynamic-slice", "slice",
                                       "transpose", "broadcast") else "computed")
      counts[kind] = counts.get(kind, 0) + 1
  counts.setdefault("computed", 0)
  return counts


def torch_steps(model, ids):
  """PEFT LoRA (same targets) and the floor (the input-norm weights' gradient only) on PyTorch."""
  import copy

  import peft
  import torch

  tids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
  floor_model = copy.deepcopy(model)
  pm = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGETS))
  pm.train()
  opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
  for name, p in floor_model.named_parameters():
    p.requires_grad_(name.endswith("input_layernorm.weight"))
  floor_model.train()

  def lora():
    pm(input_ids=tids, labels=tids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  def floor():
    floor_model(input_ids=tids, labels=tids).loss.backward()
    floor_model.zero_grad(set_to_none=True)

  return {"peft_lora": lora, "torch_floor": floor}, torch.get_num_threads()


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="XLA cost, memory and buffers only (no wall time, no torch)")
  ap.add_argument("--rounds", type=int, default=6, help="timed rounds per step (medians are reported)")
  ap.add_argument("--no-torch", action="store_true", help="skip PEFT on PyTorch")
  add_smoke_flag(ap)
  args = ap.parse_args(argv)
  config, batch, seq = (SMOKE, SMOKE_BATCH, SMOKE_SEQ) if args.smoke else (QWEN3_MOE, BATCH, SEQ)
  model = torch_model(config)
  params = jax_params(model)
  ids = jax.random.randint(jax.random.key(0), (batch, seq), 0, config["vocab_size"])
  steps, lp = jax_steps(config, params, ids)
  counts = jlora.count(lp)
  E, H, I, L = config["num_experts"], config["hidden_size"], config["moe_intermediate_size"], config["num_hidden_layers"]
  result = {"config": {**config, "batch": batch, "seq": seq, "rank": RANK, "alpha": ALPHA,
                       "targets": "all-linear: attention q/k/v/o + routed experts gate/up/down (not the router)"},
            "count": str(counts), "trainable": counts.trainable, "total": counts.total}
  shapes = [(L, E, H, I), (L, E, I, H)]
  xla = {name: xla_costs(step, a, shapes) for name, (step, a) in steps.items()}
  for name in xla:
    if name != "floor":
      xla[name]["flops_over_floor"] = xla[name]["flops"] / xla["floor"]["flops"]
      xla[name]["temp_over_floor"] = xla[name]["temp_bytes"] / xla["floor"]["temp_bytes"]
  result["xla"] = xla
  print(f"expert LoRA: FLOPs {xla['jlora']['flops_over_floor']:.3f}x and temp memory "
        f"{xla['jlora']['temp_over_floor']:.3f}x the floor's; expert-kernel-shaped buffers computed: "
        f"jlora {xla['jlora']['expert_kernel_shaped_buffers']['computed']}, floor "
        f"{xla['floor']['expert_kernel_shaped_buffers']['computed']}, full fine-tuning "
        f"{xla['full']['expert_kernel_shaped_buffers']['computed']}", flush=True)
  if not args.quick:
    fns = {k: donating_runner(*steps[k], donated=k != "floor") for k in steps}
    threads = None
    if not args.no_torch:
      try:
        peers, threads = torch_steps(model, ids)
        fns.update(peers)
      except ImportError:
        result["peft_lora"] = "torch/peft not installed"
    times = interleaved_times(fns, **rounds_of(args, args.rounds))
    wall = {f"{k}_s": median(v) for k, v in times.items()}
    for k in times:
      if k not in ("floor", "peft_lora", "torch_floor"):
        wall[f"{k}_over_floor"] = median(times[k]) / median(times["floor"])
    wall["jlora_over_jlora_experts_frozen"] = median(times["jlora"]) / median(times["jlora_experts_frozen"])
    if "peft_lora" in times:
      wall["jlora_over_peft_lora"] = median(times["jlora"]) / median(times["peft_lora"])
      wall["peft_lora_over_torch_floor"] = median(times["peft_lora"]) / median(times["torch_floor"])
      # The base model's own cost: XLA:CPU's ragged_dot is E x a grouped kernel, transformers loops over experts.
      wall["floor_over_torch_floor"] = median(times["floor"]) / median(times["torch_floor"])
      wall["torch_threads"] = threads
    wall["rounds"] = len(times["jlora"])
    result["wall"] = wall
  write_result("expert_lora" + ("_quick" if args.quick else ""), result, args=args)


if __name__ == "__main__":
  main()
