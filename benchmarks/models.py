"""jlora.models' native decoder: LoRA train-step speed vs peers, compile time vs depth, memory.

Model: a Llama-3-style config of about 100M parameters (d=768, 12 layers, 12 heads / 4 KV
heads, ffn 2048, vocab 16384, RoPE theta 500k with llama3 scaling), batch 2x128 (reduced so
that the whole run takes minutes on 2 CPU cores), LoRA r=8 (alpha 16) on all 7 projection
kinds. One train step = loss + grad w.r.t. the adapters + AdamW, jitted with donation.

  python benchmarks/models.py              # everything (~10 min on 2 cores)
  python benchmarks/models.py --quick      # compile-time and memory parts only
  python benchmarks/models.py --smoke      # tiny model (d=32, 1 and 2 layers), a few seconds: does it still run?

Reports, all measured in one process:
* LoRA step tokens/s of the native decoder (layers scanned, and unrolled), of transformers'
  FlaxLlamaForCausalLM (4.57) under jlora.wrap, and of PEFT on PyTorch CPU, timed
  interleaved (round robin);
* trace + compile time of the LoRA step at 4 and 32 layers (native: layers under a scan;
  Flax: unrolled), from abstract shapes (no weights are materialised);
* XLA temp memory of the native LoRA step vs full fine-tuning (memory_analysis).

Results go to benchmarks/results/models.json (--smoke: nowhere, unless --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
import jlora.models
from _common import SMOKE_BATCH, SMOKE_SEQ, add_smoke_flag, block, interleaved_times, median, rounds_of, write_result

warnings.filterwarnings("ignore")

HF_CONFIG = dict(model_type="llama", vocab_size=16384, hidden_size=768, intermediate_size=2048,
                 num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, head_dim=64,
                 max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
                 tie_word_embeddings=False,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
BATCH, SEQ, RANK, ALPHA = 2, 128, 8, 16
# --smoke: the same model family (GQA, free head_dim, llama3 RoPE scaling) at toy size. Few positions: transformers'
# Flax Llama builds a (positions x positions) causal mask when initialised (131072² bytes = 16 GiB for HF_CONFIG).
SMOKE_CONFIG = {**HF_CONFIG, "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
                "rope_scaling": {**HF_CONFIG["rope_scaling"], "original_max_position_embeddings": 32}}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FLAX_TARGETS = rf".*/({'|'.join(LINEAR)})/kernel"


def loss_of(logits, ids):
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()


def lora_step(forward, lora_params):
  """A donating jitted LoRA step and its arguments (adapters, opt state, frozen, ids)."""
  adapters, frozen = jlora.split(lora_params)
  tx = jlora.optimizer(optax.adamw(1e-4, weight_decay=0.01), adapters)
  wrapped = jlora.wrap(forward)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(adapters, opt_state, frozen, ids):
    loss, g = jax.value_and_grad(lambda a: loss_of(wrapped(jlora.combine(a, frozen), ids), ids))(adapters)
    u, opt_state = tx.update(g, opt_state, adapters)
    return optax.apply_updates(adapters, u), opt_state, loss

  opt_state = jax.eval_shape(tx.init, adapters) if _abstract(adapters) else tx.init(adapters)
  return step, [adapters, opt_state, frozen]


def full_step(forward, params):
  tx = optax.adamw(1e-4, weight_decay=0.01)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, ids):
    loss, g = jax.value_and_grad(lambda p: loss_of(forward(p, ids), ids))(params)
    u, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, u), opt_state, loss

  opt_state = jax.eval_shape(tx.init, params) if _abstract(params) else tx.init(params)
  return step, [params, opt_state]


def _abstract(tree) -> bool:
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def native(num_layers: int, hf_config: dict = HF_CONFIG):
  cfg = jlora.models.ModelConfig.from_hf({**hf_config, "num_hidden_layers": num_layers})
  return jlora.models.Decoder(cfg)


def flax_model(num_layers: int, *, init: bool, hf_config: dict = HF_CONFIG):
  import transformers

  hf = {k: v for k, v in hf_config.items() if k != "model_type"}
  cfg = transformers.LlamaConfig(**{**hf, "num_hidden_layers": num_layers})
  if init:
    return transformers.FlaxLlamaForCausalLM(cfg, seed=0)
  return transformers.FlaxLlamaForCausalLM(cfg, _do_init=False)


def lora_config(targets) -> jlora.LoraConfig:
  return jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=targets)


def ids_array(hf_config: dict = HF_CONFIG, batch: int = BATCH, seq: int = SEQ):
  return jax.random.randint(jax.random.key(0), (batch, seq), 0, hf_config["vocab_size"])


# -- compile time vs depth ------------------------------------------------------------------


def compile_seconds(step, args) -> dict:
  t0 = time.perf_counter()
  lowered = step.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return {"trace_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0, "compiled": compiled}


def compile_times(depths=(4, 32), hf_config: dict = HF_CONFIG, batch: int = BATCH, seq: int = SEQ) -> dict:
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  out = {}
  for name in ("native", "flax"):
    for depth in depths:
      if name == "native":
        model = native(depth, hf_config)
        shapes = model.shapes()
        lp = jax.eval_shape(lambda p: jlora.init(jax.random.key(1), p, lora_config(model.targets("all-linear")),
                                                 layout=model.layout), shapes)
        forward = lambda p, x, m=model: m(p, x)
      else:
        model = flax_model(depth, init=False, hf_config=hf_config)
        shapes = jax.eval_shape(lambda m=model: m.init_weights(jax.random.key(0), (1, 1)))
        lp = jax.eval_shape(lambda p: jlora.init(jax.random.key(1), p, lora_config(FLAX_TARGETS)), shapes)
        forward = lambda p, x, m=model: m(x, params=p).logits
      step, args = lora_step(forward, lp)
      r = compile_seconds(step, [*args, ids])
      out[f"{name}_{depth}"] = {k: round(v, 3) for k, v in r.items() if k != "compiled"}
      print(name, depth, out[f"{name}_{depth}"], flush=True)
  for name in ("native", "flax"):
    out[f"{name}_{depths[1]}_over_{depths[0]}"] = round(
        out[f"{name}_{depths[1]}"]["total_s"] / out[f"{name}_{depths[0]}"]["total_s"], 3)
  return out


# -- memory ------------------------------------------------------------------------------------


def memory(model, params, lp, ids) -> dict:
  lstep, largs = lora_step(lambda p, x: model(p, x), lp)
  fstep, fargs = full_step(lambda p, x: model(p, x), params)
  res = {}
  for name, step, args in (("lora", lstep, [*largs, ids]), ("full", fstep, [*fargs, ids])):
    compiled = step.lower(*args).compile()
    m = compiled.memory_analysis()
    res[name] = {"temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes),
                 "output_bytes": int(m.output_size_in_bytes)}
  res["lora_temp_over_full"] = round(res["lora"]["temp_bytes"] / res["full"]["temp_bytes"], 3)
  return res


# -- wall time -----------------------------------------------------------------------------


def runner(step, args, ids):
  state = list(args)

  def run():
    out = step(*state, ids)
    state[0], state[1] = out[0], out[1]
    block(out[2])

  return run


def torch_runner(hf_config: dict = HF_CONFIG, ids=None):
  import peft
  import torch
  import transformers

  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config.items() if k != "model_type"})
  model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                              peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(LINEAR)))
  model.train()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
  ids = torch.as_tensor(np.asarray(ids_array() if ids is None else ids), dtype=torch.long)

  def run():
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  return run, torch.get_num_threads()


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="compile time and memory only")
  ap.add_argument("--rounds", type=int, default=6)
  add_smoke_flag(ap)
  args = ap.parse_args(argv)
  hf_config, batch, seq = (SMOKE_CONFIG, SMOKE_BATCH, SMOKE_SEQ) if args.smoke else (HF_CONFIG, BATCH, SEQ)
  depths = (1, 2) if args.smoke else (4, 32)
  model = native(hf_config["num_hidden_layers"], hf_config)
  params = jax.jit(model.init)(jax.random.key(0))
  n_params = int(sum(x.size for x in jax.tree.leaves(params)))
  lp = jax.jit(lambda p: jlora.init(jax.random.key(1), p, lora_config(model.targets("all-linear")),
                                    layout=model.layout))(params)
  result = {"config": {**hf_config, "batch": batch, "seq": seq, "rank": RANK, "alpha": ALPHA, "targets": LINEAR},
            "params": n_params, "trainable": jlora.count(lp).trainable}
  print(f"model: {n_params / 1e6:.1f}M params", flush=True)
  ids = ids_array(hf_config, batch, seq)
  result["xla_memory_native"] = memory(model, params, lp, ids)
  print(result["xla_memory_native"], flush=True)
  result["compile_time"] = compile_times(depths, hf_config, batch, seq)
  if not args.quick:
    fm = flax_model(hf_config["num_hidden_layers"], init=True, hf_config=hf_config)
    flax_lp = jlora.init(jax.random.key(1), fm.params, lora_config(FLAX_TARGETS))
    copy = lambda t: jax.tree.map(jnp.copy, t, is_leaf=lambda x: x is None)  # donated buffers
    unrolled = dataclasses.replace(model, unroll_layers=True)
    fns = {"native": runner(*lora_step(lambda p, x: model(p, x), copy(lp)), ids),
           "native_unrolled": runner(*lora_step(lambda p, x: unrolled(p, x), copy(lp)), ids),
           "flax": runner(*lora_step(lambda p, x: fm(x, params=p).logits, copy(flax_lp)), ids)}
    torch_run, threads = torch_runner(hf_config, ids)
    fns["peft_torch"] = torch_run
    times = interleaved_times(fns, **rounds_of(args, args.rounds, warmup=1))
    wall = {f"{k}_s": round(median(v), 4) for k, v in times.items()}
    wall.update({f"{k}_tokens_per_s": round(batch * seq / median(v), 1) for k, v in times.items()})
    wall["native_over_flax_speed"] = round(median(times["flax"]) / median(times["native"]), 3)
    wall["native_unrolled_over_flax_speed"] = round(median(times["flax"]) / median(times["native_unrolled"]), 3)
    wall["native_over_peft_speed"] = round(median(times["peft_torch"]) / median(times["native"]), 3)
    wall["torch_threads"] = threads
    result["lora_step_wall"] = wall
  write_result("models" + ("_quick" if args.quick else ""), result, args=args)


if __name__ == "__main__":
  main()
