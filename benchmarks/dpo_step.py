"""A DPO train step against an SFT train step over the same 2·B sequences: XLA memory, arguments, FLOPs, wall time.

DPO (jlora.objectives.preference_logps + dpo_loss, loss_type="sigmoid") runs the policy pass
(adapters on, differentiated) and the reference pass (the same wrapped model on
jlora.unload(params) under stop_gradient: the same base arrays, no activations kept) over the B
chosen and B rejected sequences. SFT runs the policy pass alone over the same 2·B sequences (the
completion tokens' NLL). Both: loss + gradient w.r.t. the adapters + AdamW update, jitted with
the adapters and optimizer state donated, logits in chunks (token_logprobs).

Goals: DPO's temp memory <= 1.05x SFT's (the reference pass keeps nothing for the backward
pass) and one copy of the base in the arguments (the reference is not a second model).

Model: the anchor Llama of benchmarks/_common.py (d=512, ffn 1376, 4 layers, vocab 1024), LoRA
r=8 on every linear layer, float32; B = 2 pairs of 256 tokens (a 128-token prompt and a
128-token completion each).

  python benchmarks/dpo_step.py            # XLA analyses and wall time
  python benchmarks/dpo_step.py --smoke    # tiny model, a few seconds: does it still run?

Results go to benchmarks/results/dpo_step.json; --smoke writes none (unless --out).
"""

from __future__ import annotations

import argparse
import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from _common import ALPHA, LLAMA, RANK, block, interleaved_times, median, write_result
from jlora import objectives
from jlora.models import Decoder, ModelConfig

warnings.filterwarnings("ignore")

SMOKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             vocab_size=96, max_position_embeddings=64)


def losses(model: Decoder, chunk_size: int):
  def sft(params, batch):
    tok = objectives.model_token_logprobs(model, params, batch["input_ids"], batch["completion_mask"],
                                          attention_mask=batch["attention_mask"], chunk_size=chunk_size)
    n = jnp.sum(objectives.next_token_labels(batch["input_ids"], batch["completion_mask"]) >= 0)
    return -jnp.sum(tok) / jnp.maximum(n, 1)

  def dpo(params, batch):
    p = objectives.preference_logps(model, params, batch, chunk_size=chunk_size)
    return objectives.dpo_loss(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, beta=0.1)[0]

  return {"sft": sft, "dpo": dpo}


def train_step(loss, tx):
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(adapters, opt_state, frozen, batch):
    value, g = jax.value_and_grad(lambda a: loss(jlora.combine(a, frozen), batch))(adapters)
    u, opt_state = tx.update(g, opt_state, adapters)
    return optax.apply_updates(adapters, u), opt_state, value

  return step


def make_batch(pairs: int, prompt: int, completion: int, vocab: int) -> dict:
  rng = np.random.default_rng(0)
  t = prompt + completion
  ids = rng.integers(3, vocab, (2 * pairs, t))
  ids[pairs:, :prompt] = ids[:pairs, :prompt]  # the same prompts for the rejected rows
  comp = np.zeros((2 * pairs, t), np.int32)
  comp[:, prompt:] = 1
  return {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.ones((2 * pairs, t), jnp.int32),
          "completion_mask": jnp.asarray(comp)}


def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pairs", type=int, default=None, help="preference pairs per step (default 2; --smoke: 2)")
  p.add_argument("--rounds", type=int, default=None, help="timed steps per variant (default 8; --smoke: 1)")
  p.add_argument("--smoke", action="store_true", help="tiny model: checks that the benchmark runs, writes no result")
  p.add_argument("--out", default=None, help="write the result JSON here")
  a = p.parse_args(argv)
  hf = {"model_type": "llama", **(SMOKE if a.smoke else LLAMA)}
  prompt = completion = 8 if a.smoke else 128
  pairs = a.pairs or 2
  rounds = a.rounds or (1 if a.smoke else 8)
  model = Decoder(ModelConfig.from_hf(hf), unroll_layers=True)  # XLA's cost model counts a loop body once
  cfg = jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=model.targets("all-linear"))
  params = model.init(jax.random.key(0))
  lora = jlora.init(jax.random.key(1), params, cfg, layout=model.layout)
  batch = make_batch(pairs, prompt, completion, hf["vocab_size"])
  chunk = 2 * pairs * (prompt + completion)  # one chunk: XLA's cost model counts a loop body once
  tx = jlora.optimizer(optax.adamw(1e-4), jlora.split(lora)[0])
  result = {"config": {**hf, "rank": RANK, "pairs": pairs, "sequences": 2 * pairs, "prompt": prompt,
                       "completion": completion, "chunk_size": chunk, "dtype": "float32"}, "steps": {}}
  fns, states = {}, {}
  for name, loss in losses(model, chunk).items():
    adapters, frozen = jlora.split(jax.tree.map(jnp.copy, lora))
    opt_state = tx.init(adapters)
    step = train_step(loss, tx)
    compiled = step.lower(adapters, opt_state, frozen, batch).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    result["steps"][name] = {"temp_bytes": int(mem.temp_size_in_bytes),
                             "argument_bytes": int(mem.argument_size_in_bytes),
                             "base_bytes": tree_bytes(frozen), "adapter_bytes": tree_bytes(adapters),
                             "optimizer_bytes": tree_bytes(opt_state), "batch_bytes": tree_bytes(batch),
                             "flops": float(cost["flops"])}
    states[name] = [adapters, opt_state, frozen]

    def run(name=name, step=step):
      s = states[name]
      s[0], s[1], _ = block(step(s[0], s[1], s[2], batch))

    fns[name] = run
  times = interleaved_times(fns, rounds=rounds, warmup=1)
  for name, ts in times.items():
    result["steps"][name]["seconds_median"] = median(ts)
  s, d = result["steps"]["sft"], result["steps"]["dpo"]
  result["ratios"] = {"dpo/sft temp": d["temp_bytes"] / s["temp_bytes"],
                      "dpo/sft arguments": d["argument_bytes"] / s["argument_bytes"],
                      "dpo/sft flops": d["flops"] / s["flops"],
                      "dpo/sft wall time": d["seconds_median"] / s["seconds_median"]}
  # One copy of the base: the arguments are the adapters, their optimizer state, the base and the batch, once each.
  result["one_copy_of_the_base"] = all(
      r["argument_bytes"] == r["adapter_bytes"] + r["optimizer_bytes"] + r["base_bytes"] + r["batch_bytes"]
      for r in result["steps"].values())
  for name, r in result["steps"].items():
    print(f"{name}: temp {r['temp_bytes'] / 2**20:.2f} MiB, arguments {r['argument_bytes'] / 2**20:.2f} MiB (base "
          f"{r['base_bytes'] / 2**20:.2f} MiB), {r['flops'] / 1e9:.2f} GFLOP, {r['seconds_median'] * 1e3:.1f} ms")
  print(" ".join(f"{k} {v:.3f}" for k, v in result["ratios"].items()), "one copy of the base:",
        result["one_copy_of_the_base"])
  if a.out:
    with open(a.out, "w") as f:
      json.dump(result, f, indent=2)
  elif not a.smoke:
    write_result("dpo_step", result)
  return result


if __name__ == "__main__":
  main()
