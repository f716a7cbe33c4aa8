"""Inference overhead of unmerged LoRA vs the base model, and of merged weights.

Model: Llama-style, d=1024, ffn 2816, 4 layers, vocab 1024, batch 4x256; LoRA r=8 on all 7
linear kinds. Reports XLA FLOPs (deterministic) and wall-time ratios measured side by side.

  python benchmarks/forward.py
  python benchmarks/forward.py --smoke     # tiny model, a few seconds: does it still run?

Results go to benchmarks/results/forward.json (--smoke: nowhere, unless --out).
"""

from __future__ import annotations

import argparse
import warnings

import jax

import jlora
from _common import ALL_LINEAR, add_smoke_flag, block, interleaved_times, median, rounds_of, shape_of, write_result

warnings.filterwarnings("ignore")

CONFIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
              num_key_value_heads=16, vocab_size=1024, max_position_embeddings=512)
BATCH, SEQ, RANK = 4, 256, 8


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rounds", type=int, default=10)
  add_smoke_flag(ap)
  args = ap.parse_args(argv)
  import transformers

  shape = shape_of(args, llama=CONFIG, batch=BATCH, seq=SEQ)
  config, batch, seq = shape["llama"], shape["batch"], shape["seq"]
  model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**config), seed=0)
  params = model.params
  ids = jax.random.randint(jax.random.key(0), (batch, seq), 0, config["vocab_size"])
  fwd = lambda p, ids: model(ids, params=p).logits
  cfg = jlora.LoraConfig(rank=RANK, alpha=16, targets=rf".*/({'|'.join(ALL_LINEAR)})/kernel")
  lp = jlora.init(jax.random.key(1), params, cfg)
  merged = jlora.merge(lp)
  variants = {
      "base": (jax.jit(fwd), params),
      "lora_unmerged": (jax.jit(jlora.wrap(fwd)), lp),
      "merged": (jax.jit(fwd), merged),
  }
  result = {"config": {**config, "batch": batch, "seq": seq, "rank": RANK}}
  flops = {}
  for name, (fn, p) in variants.items():
    cost = fn.lower(p, ids).compile().cost_analysis()
    flops[name] = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
  result["xla_flops"] = flops
  result["xla_flops_unmerged_over_base"] = flops["lora_unmerged"] / flops["base"]
  result["xla_flops_merged_over_base"] = flops["merged"] / flops["base"]
  times = interleaved_times({k: (lambda fn=fn, p=p: block(fn(p, ids))) for k, (fn, p) in variants.items()},
                            **rounds_of(args, args.rounds))
  result["wall_s"] = {k: median(v) for k, v in times.items()}
  result["wall_unmerged_over_base"] = median(times["lora_unmerged"]) / median(times["base"])
  result["wall_merged_over_base"] = median(times["merged"]) / median(times["base"])
  write_result("forward", result, args=args)


if __name__ == "__main__":
  main()
