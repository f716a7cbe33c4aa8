"""LoRA train step vs full fine-tuning: XLA FLOPs, temp memory and wall time, with peers.

Model: Llama-style (d=512, ffn 1376, 4 layers, vocab 1024), batch 4x256, LoRA r=8 on all
7 linear kinds (the anchor shape of shared/reference/environment.md). One train step =
loss + grad w.r.t. the trainable parameters + AdamW update, jitted with donated buffers.

  python benchmarks/train_step.py            # everything (jlora, PEFT on torch, qwix)
  python benchmarks/train_step.py --quick    # XLA cost analysis only

Results go to benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import functools
import warnings

import jax
import jax.numpy as jnp
import optax

import jlora
from _common import ALL_LINEAR, ALPHA, BATCH, LLAMA, RANK, SEQ, block, interleaved_times, median, write_result

warnings.filterwarnings("ignore")


def causal_lm_loss(logits, ids):
  logits = logits[:, :-1].astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def jax_steps():
  import transformers

  model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**LLAMA), seed=0, _do_init=True)
  params = model.params
  ids = jax.random.randint(jax.random.key(0), (BATCH, SEQ), 0, LLAMA["vocab_size"])
  fwd = lambda p, ids: model(ids, params=p).logits
  tx = optax.adamw(1e-4, weight_decay=0.01)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def full_step(params, opt_state, ids):
    loss, g = jax.value_and_grad(lambda p: causal_lm_loss(fwd(p, ids), ids))(params)
    u, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, u), opt_state, loss

  cfg = jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=rf".*/({'|'.join(ALL_LINEAR)})/kernel")
  lp = jlora.init(jax.random.key(1), params, cfg)

  def make_lora(fused):
    adapters, frozen = jlora.split(jax.tree.map(jnp.copy, lp, is_leaf=lambda x: x is None))
    ltx = jlora.optimizer(tx, adapters)
    wrapped = jlora.wrap(fwd, fused_expansion=fused)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def lora_step(adapters, opt_state, frozen, ids):
      loss_fn = lambda a: causal_lm_loss(wrapped(jlora.combine(a, frozen), ids), ids)
      loss, g = jax.value_and_grad(loss_fn)(adapters)
      u, opt_state = ltx.update(g, opt_state, adapters)
      return optax.apply_updates(adapters, u), opt_state, loss

    return lora_step, (adapters, ltx.init(adapters), frozen, ids)

  # Reference: a backward pass that computes no weight gradient at all (only the
  # layer-0 input-norm weight, so every activation gradient flows through every layer).
  def no_weight_grad(params, ids):
    def loss(w):
      p = jax.tree.map(lambda t: t, params)
      p["model"]["layers"]["0"]["input_layernorm"]["weight"] = w
      return causal_lm_loss(fwd(p, ids), ids)
    return jax.grad(loss)(params["model"]["layers"]["0"]["input_layernorm"]["weight"])

  full_params = jax.tree.map(jnp.copy, params)  # donated: must not alias the frozen base
  full_args = (full_params, tx.init(full_params), ids)
  steps = {"full": (full_step, full_args), "jlora": make_lora(None), "jlora_unfused": make_lora(False),
           "no_weight_grad_backward": (jax.jit(no_weight_grad), (params, ids))}
  return model, steps, jlora.count(lp)


def qwix_steps(model, ids):
  import qwix

  rule = qwix.LoraRule(module_path=rf".*({'|'.join(ALL_LINEAR)})", rank=RANK, alpha=ALPHA)
  qmodule = qwix.apply_lora_to_model(model.module, qwix.LoraProvider([rule]))
  attn = jnp.ones_like(ids)
  pos = jnp.broadcast_to(jnp.arange(SEQ), ids.shape)
  variables = qmodule.init(jax.random.key(2), ids, attn, pos)
  params = variables["params"]
  is_lora = lambda path, _: str(getattr(path[-1], "key", "")).endswith(("_lora_a", "_lora_b"))
  labels = jax.tree_util.tree_map_with_path(lambda p, x: "lora" if is_lora(p, x) else "frozen", params)
  n_lora = sum(1 for l in jax.tree.leaves(labels) if l == "lora")
  assert n_lora == 2 * len(ALL_LINEAR) * LLAMA["num_hidden_layers"], n_lora
  tx = optax.partition({"lora": optax.adamw(1e-4, weight_decay=0.01), "frozen": optax.set_to_zero()}, labels)
  lora_mask = jax.tree.map(lambda l: l == "lora", labels)
  train = jax.tree.map(lambda t, m: t if m else None, params, lora_mask)
  frozen = jax.tree.map(lambda t, m: None if m else t, params, lora_mask)
  merge = lambda a, f: jax.tree.map(lambda x, y: y if x is None else x, a, f, is_leaf=lambda x: x is None)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(train, opt_state, frozen, ids):
    def loss_fn(t):
      logits = qmodule.apply({"params": merge(t, frozen)}, ids, attn, pos).logits
      return causal_lm_loss(logits, ids)

    loss, g = jax.value_and_grad(loss_fn)(train)
    u, opt_state = tx.update(g, opt_state, train)
    return optax.apply_updates(train, u), opt_state, loss

  return step, (train, tx.init(train), frozen, ids)


def xla_costs(step, args) -> dict:
  compiled = step.lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  return {"flops": float(cost["flops"]), "temp_bytes": int(mem.temp_size_in_bytes),
          "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes)}


def runner(step, args):
  """Calls a donating step repeatedly, threading its outputs back in."""
  state = list(args)

  def run():
    out = step(*state)
    state[0], state[1] = out[0], out[1]
    block(out[2])

  return run


def torch_times(rounds: int) -> dict:
  import peft
  import torch
  import transformers

  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**LLAMA)
  ids = torch.randint(0, LLAMA["vocab_size"], (BATCH, SEQ))

  def make(lora: bool):
    model = transformers.LlamaForCausalLM(cfg)
    if lora:
      model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(ALL_LINEAR)))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)

    def step():
      out = model(input_ids=ids, labels=ids)
      out.loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)

    return step

  times = interleaved_times({"full": make(False), "lora": make(True)}, rounds=rounds)
  return {"torch_threads": torch.get_num_threads(), "full_s": median(times["full"]),
          "lora_s": median(times["lora"]), "lora_over_full": median(times["lora"]) / median(times["full"])}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="XLA cost analysis only (no wall time, no peers)")
  ap.add_argument("--rounds", type=int, default=8)
  args = ap.parse_args()

  model, steps, counts = jax_steps()
  ids = steps["full"][1][2]
  result = {"config": {**LLAMA, "batch": BATCH, "seq": SEQ, "rank": RANK, "targets": ALL_LINEAR},
            "trainable": counts.trainable, "total": counts.total}
  try:
    steps["qwix"] = qwix_steps(model, ids)
  except ImportError:
    result["qwix"] = "not installed (pip install qwix==0.1.8)"
  xla = {name: xla_costs(step, a) for name, (step, a) in steps.items()}
  for name in list(xla):
    if name != "full":
      xla[f"{name}_flops_over_full"] = xla[name]["flops"] / xla["full"]["flops"]
      xla[f"{name}_temp_over_full"] = xla[name]["temp_bytes"] / xla["full"]["temp_bytes"]
  result["xla"] = xla
  if not args.quick:
    timed = [k for k in ("full", "jlora", "jlora_unfused", "qwix") if k in steps]
    times = interleaved_times({k: runner(*steps[k]) for k in timed}, rounds=args.rounds)
    wall = {f"{k}_s": median(v) for k, v in times.items()}
    for k in timed[1:]:
      wall[f"{k}_over_full"] = median(times[k]) / median(times["full"])
    result["wall_jax"] = wall
    try:
      result["wall_peft_torch"] = torch_times(args.rounds)
    except ImportError:
      result["wall_peft_torch"] = "torch/peft not installed"
  write_result("train_step" + ("_quick" if args.quick else ""), result)


if __name__ == "__main__":
  main()
