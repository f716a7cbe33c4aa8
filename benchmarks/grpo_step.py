"""A GRPO step's two halves, side by side: rollouts from the unmerged adapters, and the train step.

Rollout: ``G`` completions of each prompt sampled with the jitted KV-cache generator
(``jlora.models.generate.generate_tokens``) on the LoRA tree as it is. Against it, the same
rollout the way TRL 1.16 does it with a PEFT model: merge the adapter into the weights, generate
with the merged weights, unmerge (``W + s·BA``, then ``W − s·BA``: two passes over the adapted
kernels, here as two jitted programs). Train: the GRPO loss (``dapo``, with the old policy's and
the reference's log-probs as a second iteration and ``beta > 0`` need them) + its gradient
w.r.t. the adapters + AdamW, the adapters and optimizer state donated. All three are timed
interleaved in one run; tokens/s count the generated tokens (rollout) and the rows' real tokens
(train).

Memory (XLA's analyses of the compiled programs): the train step's arguments hold one copy of
the base (``one_copy_of_the_base``); the unmerged rollout's arguments are the base and the
adapters, nothing else, while the merged one needs the merged weights beside the base (a second
copy while it generates, unless the base is overwritten in place, as PyTorch does).

Model: the anchor Llama of benchmarks/_common.py (d=512, ffn 1376, 4 layers, vocab 1024), LoRA
r=8 on every linear layer, float32; 2 prompts of 64 tokens, G = 8 completions of 64 tokens.

  python benchmarks/grpo_step.py            # XLA analyses and wall time
  python benchmarks/grpo_step.py --smoke    # tiny model, a few seconds: does it still run?

Results go to benchmarks/results/grpo_step.json; --smoke writes none (unless --out).
"""

from __future__ import annotations

import argparse
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from _common import ALL_LINEAR, ALPHA, LLAMA, RANK, add_smoke_flag, block, interleaved_times, median, rounds_of, \
    write_result
from jlora import objectives
from jlora.models import Decoder, ModelConfig
from jlora.models.generate import generate_tokens

warnings.filterwarnings("ignore")

SMOKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             vocab_size=96, max_position_embeddings=64)


def _bytes(tree) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  return {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
          "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes)}


def unmerge(merged, lora):
  """TRL's unmerge_adapter: the merged kernels minus the low-rank product (the base again, up to rounding)."""
  return jax.tree.map(lambda m, full, w0: m - (full - w0), merged, jlora.merge(lora), jlora.unload(lora))


def main(argv=None) -> dict:
  ap = add_smoke_flag(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
  ap.add_argument("--rounds", type=int, default=5)
  args = ap.parse_args(argv)
  cfg = ModelConfig.from_hf({"model_type": "llama", **(SMOKE if args.smoke else LLAMA)})
  model = Decoder(cfg)
  prompts, g = 2, 8
  p_len, c_len = (8, 8) if args.smoke else (64, 64)
  base = model.init(jax.random.key(0))
  lora_cfg = jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=model.targets(",".join(ALL_LINEAR)))
  lora = jlora.init(jax.random.key(1), base, lora_cfg, layout=model.layout)
  lora = jax.tree.map(lambda w: w.replace(b=0.01 * jax.random.normal(jax.random.key(2), w.b.shape, w.b.dtype))
                      if isinstance(w, jlora.LoraWeight) else w, lora, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
  rng = np.random.default_rng(0)
  ids, mask = objectives.pad_prompts([rng.integers(3, cfg.vocab_size, p_len).tolist() for _ in range(prompts)],
                                     num_generations=g, width=p_len)
  key = jax.random.key(3)
  gen = dict(max_new_tokens=c_len, temperature=1.0, top_k=50, eos_id=(), key=key)  # every row: c_len tokens

  # -- rollouts ------------------------------------------------------------------------------------
  merge = jax.jit(jlora.merge)
  unmerge_fn = jax.jit(unmerge)

  def unmerged():
    return block(generate_tokens(model, lora, ids, mask, **gen).tokens)

  def trl_way():
    merged = merge(lora)
    out = block(generate_tokens(model, merged, ids, mask, **gen).tokens)
    block(unmerge_fn(merged, lora))
    return out

  same = bool(np.array_equal(np.asarray(unmerged()), np.asarray(trl_way())))  # the same samples either way

  # -- the train step ------------------------------------------------------------------------------
  full_ids = jnp.concatenate([jnp.asarray(ids), jnp.asarray(rng.integers(3, cfg.vocab_size, (prompts * g, c_len)),
                                                            jnp.int32)], axis=1)
  comp = jnp.concatenate([jnp.zeros((prompts * g, p_len), jnp.int32), jnp.ones((prompts * g, c_len), jnp.int32)], 1)
  attn = jnp.concatenate([jnp.asarray(mask), jnp.ones((prompts * g, c_len), jnp.int32)], 1)
  logps = jax.jit(lambda p: objectives.model_token_logprobs(model, p, full_ids, comp, attention_mask=attn))
  old, ref = logps(lora), jax.jit(lambda p: objectives.model_token_logprobs(model, p, full_ids, comp,
                                                                            attention_mask=attn, reference=True))(lora)
  batch = {"input_ids": full_ids, "completion_mask": comp, "attention_mask": attn,
           "advantages": jnp.asarray(rng.normal(size=prompts * g), jnp.float32), "old_logps": old, "ref_logps": ref}
  tx = optax.adamw(1e-4)
  adapters, frozen = jlora.split(lora)

  def loss(a, frozen, batch):
    params = jlora.combine(a, frozen)
    lp = objectives.model_token_logprobs(model, params, batch["input_ids"], batch["completion_mask"],
                                         attention_mask=batch["attention_mask"])
    pos = objectives.next_token_labels(batch["input_ids"], batch["completion_mask"]) >= 0
    total, count, _ = objectives.grpo_loss_terms(lp, batch["advantages"], pos, old_logps=batch["old_logps"],
                                                 ref_logps=batch["ref_logps"], beta=0.04, epsilon_high=0.28)
    return total / count

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(a, opt_state, frozen, batch):
    value, grads = jax.value_and_grad(loss)(a, frozen, batch)
    updates, opt_state = tx.update(grads, opt_state, a)
    return optax.apply_updates(a, updates), opt_state, value

  state = {"a": jax.tree.map(jnp.copy, adapters), "opt": tx.init(adapters)}  # (the step donates them)
  step_compiled = step.lower(state["a"], state["opt"], frozen, batch).compile()

  def train():
    state["a"], state["opt"], value = step(state["a"], state["opt"], frozen, batch)
    return block(value)

  # -- memory -------------------------------------------------------------------------------------
  base_bytes, adapter_bytes = _bytes(base), _bytes(adapters)
  args_step = _memory(step_compiled)
  others = _bytes(state["a"]) + _bytes(state["opt"]) + _bytes(batch)
  gen_lora = _memory(jax.jit(lambda p: generate_tokens(model, p, ids, mask, **gen).tokens).lower(lora).compile())
  merged_shape = jax.eval_shape(jlora.merge, lora)
  gen_merged = _memory(jax.jit(lambda p: generate_tokens(model, p, ids, mask, **gen).tokens).lower(
      merged_shape).compile())
  memory = {
      "base_bytes": base_bytes, "adapter_bytes": adapter_bytes,
      "train_step": {**args_step, "base_copies_in_arguments": (args_step["argument_bytes"] - others) / base_bytes},
      "rollout_unmerged": {**gen_lora, "arguments_over_base": gen_lora["argument_bytes"] / base_bytes},
      "rollout_merged": {**gen_merged, "merged_copy_bytes": _bytes(merged_shape),
                         "live_weights_over_base": (base_bytes + adapter_bytes + _bytes(merged_shape)) / base_bytes},
  }
  one_copy = abs(memory["train_step"]["base_copies_in_arguments"] - 1.0) < 0.02

  # -- wall time ----------------------------------------------------------------------------------
  times = interleaved_times({"rollout_unmerged": unmerged, "rollout_trl_way": trl_way, "train": train},
                            **rounds_of(args, args.rounds))
  s = {k: median(v) for k, v in times.items()}
  generated, trained = prompts * g * c_len, int(np.asarray(attn).sum())
  wall = {
      "rounds": len(times["train"]),
      **{f"{k}_s": v for k, v in s.items()},
      "rollout_unmerged_tokens_per_s": generated / s["rollout_unmerged"],
      "rollout_trl_way_tokens_per_s": generated / s["rollout_trl_way"],
      "train_tokens_per_s": trained / s["train"],
      "rollout_share_of_step": s["rollout_unmerged"] / (s["rollout_unmerged"] + s["train"]),
      "unmerged_over_trl_way_speed": s["rollout_trl_way"] / s["rollout_unmerged"],
  }
  result = {
      "config": {**{k: v for k, v in (SMOKE if args.smoke else LLAMA).items()}, "rank": RANK, "prompts": prompts,
                 "num_generations": g, "prompt_tokens": p_len, "completion_tokens": c_len, "dtype": "float32"},
      "same_samples_unmerged_and_merged": same,
      "one_copy_of_the_base": one_copy,
      "memory": memory,
      "wall": wall,
  }
  write_result("grpo_step", result, args=args)
  return result


if __name__ == "__main__":
  main()
