"""DoRA vs LoRA train step: XLA FLOPs, temp memory and wall time, beside PEFT on PyTorch CPU.

Same model and step as train_step.py (Llama-style d=512, ffn 1376, 4 layers, vocab 1024,
batch 4x256, r=8 on all 7 linear kinds, AdamW), with DoRA adapters instead of LoRA. PEFT's
DoRA (use_dora=True) and LoRA run in the same process, interleaved with jlora's, so the
ratios see the same machine load.

  python benchmarks/dora_step.py            # everything
  python benchmarks/dora_step.py --quick    # XLA cost analysis only

Results go to benchmarks/results/dora_step.json.
"""

from __future__ import annotations

import argparse
import functools
import warnings

import jax
import jax.numpy as jnp
import optax

import jlora
from _common import ALL_LINEAR, ALPHA, BATCH, LLAMA, RANK, SEQ, interleaved_times, median, write_result
from train_step import causal_lm_loss, runner, xla_costs

warnings.filterwarnings("ignore")


def jax_steps():
  import transformers

  model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**LLAMA), seed=0, _do_init=True)
  params = model.params
  ids = jax.random.randint(jax.random.key(0), (BATCH, SEQ), 0, LLAMA["vocab_size"])
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


def torch_steps():
  import peft
  import torch
  import transformers

  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**LLAMA)
  ids = torch.randint(0, LLAMA["vocab_size"], (BATCH, SEQ))

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


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="XLA cost analysis only")
  ap.add_argument("--rounds", type=int, default=8)
  args = ap.parse_args()
  steps = jax_steps()
  xla = {k: xla_costs(s, a) for k, (s, a) in steps.items()}
  xla["dora_flops_over_lora"] = xla["dora"]["flops"] / xla["lora"]["flops"]
  xla["dora_temp_over_lora"] = xla["dora"]["temp_bytes"] / xla["lora"]["temp_bytes"]
  result = {"config": {**LLAMA, "batch": BATCH, "seq": SEQ, "rank": RANK, "targets": ALL_LINEAR}, "xla": xla}
  if not args.quick:
    fns = {k: runner(*v) for k, v in steps.items()}
    try:
      torch_fns, threads = torch_steps()
      fns.update(torch_fns)
      result["torch_threads"] = threads
    except ImportError:
      result["peft"] = "torch/peft not installed"
    times = interleaved_times(fns, rounds=args.rounds)
    wall = {f"{k}_s": median(v) for k, v in times.items()}
    wall["jlora_dora_over_jlora_lora"] = wall["dora_s"] / wall["lora_s"]
    if "peft_dora_s" in wall:
      wall["peft_dora_over_peft_lora"] = wall["peft_dora_s"] / wall["peft_lora_s"]
      wall["jlora_dora_over_peft_dora"] = wall["dora_s"] / wall["peft_dora_s"]
    result["wall"] = wall
  write_result("dora_step" + ("_quick" if args.quick else ""), result)


if __name__ == "__main__":
  main()
