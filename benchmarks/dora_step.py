"""DoRA vs LoRA train step: XLA FLOPs, temp memory and wall time, beside PEFT on PyTorch CPU.

Same model and step as train_step.py (Llama-style d=512, ffn 1376, 4 layers, vocab 1024,
batch 4x256, r=8 on all 7 linear kinds, AdamW), with DoRA adapters instead of LoRA. PEFT's
DoRA (use_dora=True) and LoRA run in the same process, interleaved with jlora's, so the
ratios see the same machine load.

  python benchmarks/dora_step.py            # everything
  python benchmarks/dora_step.py --quick    # XLA cost analysis only
  python benchmarks/dora_step.py --smoke    # tiny model, a few seconds: does it still run?

Results go to benchmarks/results/dora_step.json (--smoke: nowhere, unless --out).
"""

from __future__ import annotations

import argparse
import functools
import warnings

import jax
import jax.numpy as jnp
import optax

import jlora
from _common import (ALL_LINEAR, ALPHA, BATCH, LLAMA, RANK, SEQ, add_smoke_flag, donating_runner, interleaved_times,
                     median, rounds_of, shape_of, write_result)
from train_step import causal_lm_loss, xla_costs

warnings.filterwarnings("ignore")


def jax_steps(llama: dict = LLAMA, batch: int = BATCH, seq: int = SEQ):
  import transformers

  model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**llama), seed=0, _do_init=True)
  params = model.params
  ids = jax.random.randint(jax.random.key(0), (batch, seq), 0, llama["vocab_size"])
  fwd = lambda p, ids: model(ids, params=p).logits
  tx = optax.adamw(1e-4, weight_decay=0.01)
  targets = rf".*/({'|'.join(ALL_LINEAR)})/kernel"

  def make(dora: bool):
    cfg = jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=targets, dora=dora)
    lp = jlora.init(jax.random.key(1), params, cfg)
    adapters, frozen = jlora.split(jax.tree.map(jnp.copy, lp, is_leaf=lambda x: x is None))
    ltx = jlora.optimizer(tx, adapters)
    wrapped = jlora.wrap(fwd)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(adapters, opt_state, frozen, ids):
      loss, g = jax.value_and_grad(lambda a: causal_lm_loss(wrapped(jlora.combine(a, frozen), ids), ids))(adapters)
      u, opt_state = ltx.update(g, opt_state, adapters)
      return optax.apply_updates(adapters, u), opt_state, loss

    return step, (adapters, ltx.init(adapters), frozen, ids)

  return {"lora": make(False), "dora": make(True)}


def torch_steps(llama: dict = LLAMA, batch: int = BATCH, seq: int = SEQ):
  import peft
  import torch
  import transformers

  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**llama)
  ids = torch.randint(0, llama["vocab_size"], (batch, seq))

  def make(dora: bool):
    model = transformers.LlamaForCausalLM(cfg)
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(ALL_LINEAR),
                                                       use_dora=dora))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)

    def step():
      model(input_ids=ids, labels=ids).loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)

    return step

  return {"peft_lora": make(False), "peft_dora": make(True)}, torch.get_num_threads()


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="XLA cost analysis only")
  ap.add_argument("--rounds", type=int, default=8)
  add_smoke_flag(ap)
  args = ap.parse_args(argv)
  shape = shape_of(args)
  steps = jax_steps(**shape)
  xla = {k: xla_costs(s, a) for k, (s, a) in steps.items()}
  xla["dora_flops_over_lora"] = xla["dora"]["flops"] / xla["lora"]["flops"]
  xla["dora_temp_over_lora"] = xla["dora"]["temp_bytes"] / xla["lora"]["temp_bytes"]
  result = {"config": {**shape["llama"], "batch": shape["batch"], "seq": shape["seq"], "rank": RANK,
                       "targets": ALL_LINEAR}, "xla": xla}
  if not args.quick:
    fns = {k: donating_runner(*v, donated=True) for k, v in steps.items()}
    try:
      torch_fns, threads = torch_steps(**shape)
      fns.update(torch_fns)
      result["torch_threads"] = threads
    except ImportError:
      result["peft"] = "torch/peft not installed"
      print("torch/peft not installed: the PEFT peers are skipped", flush=True)
    times = interleaved_times(fns, **rounds_of(args, args.rounds))
    wall = {f"{k}_s": median(v) for k, v in times.items()}
    wall["jlora_dora_over_jlora_lora"] = wall["dora_s"] / wall["lora_s"]
    if "peft_dora_s" in wall:
      wall["peft_dora_over_peft_lora"] = wall["peft_dora_s"] / wall["peft_lora_s"]
      wall["jlora_dora_over_peft_dora"] = wall["dora_s"] / wall["peft_dora_s"]
    result["wall"] = wall
  write_result("dora_step" + ("_quick" if args.quick else ""), result, args=args)


if __name__ == "__main__":
  main()
