"""LoRA train step vs its physical floor and full fine-tuning: XLA FLOPs, memory, wall time.

The *floor* is the backward pass that computes every activation gradient and no weight
gradient at all (``no_weight_grad_backward``: the gradient of the layer-0 input-norm weight
only, so that every activation gradient flows through every layer). No LoRA step can cost
less; the adapters' own six rank-r matmuls per layer come on top.

Models: Llama-style (d=512, ffn 1376, 4 layers, vocab 1024) with LoRA r=8 on all 7 linear
kinds, at three shapes (each 1024 tokens per step):

  mha_t256  8 heads / 8 KV heads, batch 4 x 256   (the anchor of shared/reference/environment.md)
  gqa_t128  8 heads / 2 KV heads, batch 8 x 128
  mha_t32   8 heads / 8 KV heads, batch 32 x 32   (short sequences)

One train step = loss + grad w.r.t. the trainable parameters + AdamW update, jitted with
donated buffers. Peers in the same run: qwix 0.1.8 (JAX) and PEFT on PyTorch CPU.

  python benchmarks/train_step.py                   # everything
  python benchmarks/train_step.py --quick           # XLA cost and memory analysis only
  python benchmarks/train_step.py --shapes mha_t256 # one shape
  python benchmarks/train_step.py --smoke           # tiny model, a few seconds: does it still run?

Results go to benchmarks/results/train_step.json (train_step_quick.json with --quick); --smoke
writes none (unless --out), and shrinks each shape to the tiny model of _common.SMOKE_LLAMA.
"""

from __future__ import annotations

import argparse
import functools
import warnings

import jax
import jax.numpy as jnp
import optax

import jlora
from _common import (ALL_LINEAR, ALPHA, LLAMA, RANK, SMOKE_BATCH, SMOKE_LLAMA, SMOKE_SEQ, add_smoke_flag,
                     compiled_costs, donating_runner, interleaved_times, median, rounds_of, write_result)

warnings.filterwarnings("ignore")

SHAPES = {
    "mha_t256": dict(num_key_value_heads=8, batch=4, seq=256),
    "gqa_t128": dict(num_key_value_heads=2, batch=8, seq=128),
    "mha_t32": dict(num_key_value_heads=8, batch=32, seq=32),
}


def causal_lm_loss(logits, ids):
  logits = logits[:, :-1].astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def shape_spec(shape: str, smoke: bool = False) -> dict:
  """Batch, sequence and KV heads of a shape; ``smoke``: the same head ratio on the tiny model."""
  s = SHAPES[shape]
  if not smoke:
    return s
  kv = SMOKE_LLAMA["num_attention_heads"] * s["num_key_value_heads"] // LLAMA["num_attention_heads"]
  return {"num_key_value_heads": kv, "batch": SMOKE_BATCH, "seq": SMOKE_SEQ}


def model_config(shape: str, smoke: bool = False) -> dict:
  s = shape_spec(shape, smoke)
  return {**(SMOKE_LLAMA if smoke else LLAMA), "num_key_value_heads": s["num_key_value_heads"]}


def jax_steps(shape: str, smoke: bool = False):
  import transformers

  s, config = shape_spec(shape, smoke), model_config(shape, smoke)
  model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**config), seed=0, _do_init=True)
  params = model.params
  ids = jax.random.randint(jax.random.key(0), (s["batch"], s["seq"]), 0, config["vocab_size"])
  fwd = lambda p, ids: model(ids, params=p).logits
  tx = optax.adamw(1e-4, weight_decay=0.01)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def full_step(params, opt_state, ids):
    loss, g = jax.value_and_grad(lambda p: causal_lm_loss(fwd(p, ids), ids))(params)
    u, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, u), opt_state, loss

  cfg = jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=rf".*/({'|'.join(ALL_LINEAR)})/kernel")
  lp = jlora.init(jax.random.key(1), params, cfg)

  def make_lora(lowering):
    adapters, frozen = jlora.split(jax.tree.map(jnp.copy, lp, is_leaf=lambda x: x is None))
    ltx = jlora.optimizer(tx, adapters)
    wrapped = jlora.wrap(fwd, fused_expansion=lowering)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def lora_step(adapters, opt_state, frozen, ids):
      loss_fn = lambda a: causal_lm_loss(wrapped(jlora.combine(a, frozen), ids), ids)
      loss, g = jax.value_and_grad(loss_fn)(adapters)
      u, opt_state = ltx.update(g, opt_state, adapters)
      return optax.apply_updates(adapters, u), opt_state, loss

    return lora_step, (adapters, ltx.init(adapters), frozen, ids)

  def no_weight_grad(params, ids):
    def loss(w):
      p = jax.tree.map(lambda t: t, params)
      p["model"]["layers"]["0"]["input_layernorm"]["weight"] = w
      return causal_lm_loss(fwd(p, ids), ids)
    return jax.grad(loss)(params["model"]["layers"]["0"]["input_layernorm"]["weight"])

  full_params = jax.tree.map(jnp.copy, params)  # donated: must not alias the frozen base
  steps = {
      "full": (full_step, (full_params, tx.init(full_params), ids)),
      "jlora": make_lora(None),
      "jlora_autodiff": make_lora(False),  # plain autodiff of the same low-rank path
      "floor": (jax.jit(no_weight_grad), (params, ids)),
  }
  return model, steps, jlora.count(lp)


def qwix_step(model, ids):
  import qwix

  s_len = ids.shape[1]
  rule = qwix.LoraRule(module_path=rf".*({'|'.join(ALL_LINEAR)})", rank=RANK, alpha=ALPHA)
  qmodule = qwix.apply_lora_to_model(model.module, qwix.LoraProvider([rule]))
  attn = jnp.ones_like(ids)
  pos = jnp.broadcast_to(jnp.arange(s_len), ids.shape)
  variables = qmodule.init(jax.random.key(2), ids, attn, pos)
  params = variables["params"]
  is_lora = lambda path, _: str(getattr(path[-1], "key", "")).endswith(("_lora_a", "_lora_b"))
  labels = jax.tree_util.tree_map_with_path(lambda p, x: "lora" if is_lora(p, x) else "frozen", params)
  n_lora = sum(1 for l in jax.tree.leaves(labels) if l == "lora")
  assert n_lora == 2 * len(ALL_LINEAR) * model.config.num_hidden_layers, n_lora
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
  """FLOPs and memory from XLA's cost and memory analysis of the compiled step (``compiled_costs``)."""
  return compiled_costs(step.lower(*args).compile())


def torch_steps(shape: str, smoke: bool = False):
  """PEFT LoRA, full fine-tuning and the floor (no weight gradient) on PyTorch CPU."""
  import peft
  import torch
  import transformers

  s, config = shape_spec(shape, smoke), model_config(shape, smoke)
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**config)
  ids = torch.randint(0, config["vocab_size"], (s["batch"], s["seq"]))

  def make(kind: str):
    model = transformers.LlamaForCausalLM(cfg)
    if kind == "lora":
      model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(ALL_LINEAR)))
    if kind == "floor":
      for name, p in model.named_parameters():
        p.requires_grad_(name == "model.layers.0.input_layernorm.weight")
    model.train()
    opt = None
    if kind != "floor":
      opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)

    def step():
      out = model(input_ids=ids, labels=ids)
      out.loss.backward()
      if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
      else:
        model.zero_grad(set_to_none=True)

    return step

  return {"torch_full": make("full"), "peft_lora": make("lora"), "torch_floor": make("floor")}, torch.get_num_threads()


def run_shape(shape: str, *, quick: bool, rounds: int, torch_peers: bool, warmup: int = 2,
              smoke: bool = False) -> dict:
  s = shape_spec(shape, smoke)
  model, steps, counts = jax_steps(shape, smoke)
  ids = steps["full"][1][2]
  result = {"config": {**model_config(shape, smoke), "batch": s["batch"], "seq": s["seq"], "rank": RANK,
                       "targets": ALL_LINEAR},
            "trainable": counts.trainable, "total": counts.total}
  try:
    steps["qwix"] = qwix_step(model, ids)
  except ImportError:
    result["qwix"] = "not installed (pip install qwix==0.1.8)"
    print(f"{shape}: qwix not installed, its step skipped (pip install qwix==0.1.8)", flush=True)
  xla = {name: xla_costs(step, a) for name, (step, a) in steps.items()}
  for name in list(xla):
    for ref in ("floor", "full"):
      if name != ref:
        xla[name][f"flops_over_{ref}"] = xla[name]["flops"] / xla[ref]["flops"]
        xla[name][f"temp_over_{ref}"] = xla[name]["temp_bytes"] / xla[ref]["temp_bytes"]
    if name != "full":
      xla[name]["peak_over_full"] = xla[name]["peak_bytes"] / xla["full"]["peak_bytes"]
  result["xla"] = xla
  if quick:
    return result
  fns = {k: donating_runner(*steps[k], donated=k != "floor")
         for k in ("floor", "jlora", "full", "jlora_autodiff", "qwix") if k in steps}
  threads = None
  if torch_peers:
    try:
      peers, threads = torch_steps(shape, smoke)
      fns.update(peers)
    except ImportError:
      result["wall_torch"] = "torch/peft not installed"
      print(f"{shape}: torch/peft not installed, the PyTorch peers skipped", flush=True)
  times = interleaved_times(fns, rounds=rounds, warmup=warmup)
  wall = {f"{k}_s": median(v) for k, v in times.items()}
  for k in times:
    if k != "floor" and k in steps:
      wall[f"{k}_over_floor"] = median(times[k]) / median(times["floor"])
      if k != "full":
        wall[f"{k}_over_full"] = median(times[k]) / median(times["full"])
  if "peft_lora" in times:
    wall["jlora_over_peft_lora"] = median(times["jlora"]) / median(times["peft_lora"])
    wall["peft_lora_over_torch_floor"] = median(times["peft_lora"]) / median(times["torch_floor"])
    wall["floor_over_torch_floor"] = median(times["floor"]) / median(times["torch_floor"])
    wall["torch_threads"] = threads
  wall["rounds"] = rounds
  result["wall"] = wall
  return result


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="XLA cost and memory analysis only (no wall time, no torch)")
  ap.add_argument("--rounds", type=int, default=8, help="timed rounds per step (medians are reported)")
  ap.add_argument("--shapes", default=None,
                  help=f"comma-separated subset of {list(SHAPES)} (default: all; with --smoke: mha_t256)")
  ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch/PEFT peers")
  add_smoke_flag(ap)
  args = ap.parse_args(argv)
  shapes = [s for s in (args.shapes or ("mha_t256" if args.smoke else ",".join(SHAPES))).split(",") if s]
  unknown = [s for s in shapes if s not in SHAPES]
  if unknown:
    ap.error(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
  result = {"shapes": {}}
  for shape in shapes:
    result["shapes"][shape] = run_shape(shape, quick=args.quick, torch_peers=not args.no_torch, smoke=args.smoke,
                                        **rounds_of(args, args.rounds))
  write_result("train_step" + ("_quick" if args.quick else ""), result, args=args)


if __name__ == "__main__":
  main()
