"""QLoRA (NF4 + double quantization) vs bf16 LoRA on the same model, with qwix's NF4 QLoRA as the JAX peer.

Model: transformers' Flax Llama in bfloat16, LoRA r=8 on all 7 linear kinds, AdamW; one train
step = loss + grad w.r.t. the adapters + update, jitted with donated buffers. Two shapes:

* ``anchor``: d=512, ffn 1376, 4 layers, batch 4x256 (the anchor of benchmarks/train_step.py;
  activations dominate);
* ``weights``: d=1024, ffn 2816, 4 layers, batch 1x64 (the weights dominate, as when a large
  model is fine-tuned with a small batch).

Variants: ``bf16_lora`` (jlora over the bfloat16 base), ``qlora`` (jlora over ``jlora.quantize``d
NF4 + double quantization, blocksize 64), ``qwix_qlora`` (qwix 0.1.8 LoraRule with
weight_qtype="nf4", tile_size=64: no double quantization, scales in the weight dtype).
Reported per variant: stored base bytes, XLA temp and argument bytes of the compiled step, peak
(arguments + temp) and the median wall time of interleaved runs, with ratios to bf16 LoRA.

  python benchmarks/qlora.py              # both shapes, wall times (rounds=6)
  python benchmarks/qlora.py --quick      # XLA memory only
  python benchmarks/qlora.py --smoke      # the anchor shape on a tiny model, a few seconds: does it still run?

Results go to benchmarks/results/qlora.json (--smoke: nowhere, unless --out).
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
from _common import (ALL_LINEAR, ALPHA, RANK, SMOKE_BATCH, SMOKE_LLAMA, SMOKE_SEQ, add_smoke_flag, block,
                     interleaved_times, median, rounds_of, write_result)

warnings.filterwarnings("ignore")

SHAPES = {
    "anchor": dict(llama=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                              num_key_value_heads=8, vocab_size=1024, max_position_embeddings=512), batch=4, seq=256),
    "weights": dict(llama=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                               num_key_value_heads=8, vocab_size=1024, max_position_embeddings=512), batch=1, seq=64),
}
# --smoke: each shape on the tiny model (its kernels still hold whole 64-value blocks).
SMOKE_SHAPES = {"anchor": dict(llama=SMOKE_LLAMA, batch=SMOKE_BATCH, seq=SMOKE_SEQ),
                "weights": dict(llama=SMOKE_LLAMA, batch=1, seq=SMOKE_SEQ // 2)}
TARGETS = rf".*/({'|'.join(ALL_LINEAR)})/kernel"


def loss_fn(logits, ids):
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()


def nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def jlora_step(fwd, base, ids):
  tx = optax.adamw(1e-4, weight_decay=0.01)
  lp = jlora.init(jax.random.key(1), base, jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS))
  adapters, frozen = jlora.split(lp)
  ltx = jlora.optimizer(tx, adapters)
  wrapped = jlora.wrap(fwd)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(adapters, opt_state, frozen, ids):
    loss, g = jax.value_and_grad(lambda a: loss_fn(wrapped(jlora.combine(a, frozen), ids), ids))(adapters)
    u, opt_state = ltx.update(g, opt_state, adapters)
    return optax.apply_updates(adapters, u), opt_state, loss

  return step, (adapters, ltx.init(adapters), frozen, ids), nbytes(frozen)


def qwix_step(model, params, ids):
  import qwix

  rule = qwix.LoraRule(module_path=rf".*({'|'.join(ALL_LINEAR)})", rank=RANK, alpha=ALPHA, weight_qtype="nf4",
                       tile_size=64)
  qmodule = qwix.apply_lora_to_model(model.module, qwix.LoraProvider([rule]))
  attn = jnp.ones_like(ids)
  pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  abstract = jax.eval_shape(lambda: qmodule.init(jax.random.key(2), ids, attn, pos))["params"]
  is_lora = lambda path: str(getattr(path[-1], "key", "")).endswith(("_lora_a", "_lora_b"))
  # The 4-bit base from the bf16 weights (qwix's PTQ path); the adapters from qwix's init.
  qparams = qwix.quantize_params(params, abstract)
  fresh = qmodule.init(jax.random.key(2), ids, attn, pos)["params"]
  import flax

  flat_fresh = flax.traverse_util.flatten_dict(flax.core.unfreeze(fresh))
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(qparams))
  for k, v in flat_fresh.items():
    if str(k[-1]).endswith(("_lora_a", "_lora_b")):
      flat[k] = v
  full = flax.traverse_util.unflatten_dict(flat)
  labels = jax.tree_util.tree_map_with_path(lambda p, _: "lora" if is_lora(p) else "frozen", full)
  mask = jax.tree.map(lambda l: l == "lora", labels)
  train = jax.tree.map(lambda t, m: t if m else None, full, mask)
  frozen = jax.tree.map(lambda t, m: None if m else t, full, mask)
  merge = lambda a, f: jax.tree.map(lambda x, y: y if x is None else x, a, f, is_leaf=lambda x: x is None)
  tx = optax.partition({"lora": optax.adamw(1e-4, weight_decay=0.01), "frozen": optax.set_to_zero()}, labels)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(train, opt_state, frozen, ids):
    def f(t):
      return loss_fn(qmodule.apply({"params": merge(t, frozen)}, ids, attn, pos).logits, ids)

    loss, g = jax.value_and_grad(f)(train)
    u, opt_state = tx.update(g, opt_state, train)
    return optax.apply_updates(train, u), opt_state, loss

  return step, (train, tx.init(train), frozen, ids), nbytes(frozen)


def memory(step, args) -> dict:
  mem = step.lower(*args).compile().memory_analysis()
  temp, arg = int(mem.temp_size_in_bytes), int(mem.argument_size_in_bytes)
  return {"temp_bytes": temp, "argument_bytes": arg, "peak_bytes": temp + arg}


def runner(step, args):
  state = list(args)

  def run():
    out = step(*state)
    state[0], state[1] = out[0], out[1]
    block(out[2])

  return run


def bench(shape: str, rounds: int, quick: bool, *, warmup: int = 2, smoke: bool = False) -> dict:
  import transformers

  spec = (SMOKE_SHAPES if smoke else SHAPES)[shape]
  model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**spec["llama"]), seed=0, dtype=jnp.bfloat16)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params)
  ids = jax.random.randint(jax.random.key(0), (spec["batch"], spec["seq"]), 0, spec["llama"]["vocab_size"])
  fwd = lambda p, ids: model(ids, params=p).logits
  qparams = jlora.quantize(params, targets=TARGETS)
  variants = {"bf16_lora": jlora_step(fwd, params, ids), "qlora": jlora_step(fwd, qparams, ids)}
  out: dict = {"config": {**spec["llama"], "batch": spec["batch"], "seq": spec["seq"], "rank": RANK},
               "quantized_bits_per_param": jlora.quant.storage_bits(qparams)}
  try:
    variants["qwix_qlora"] = qwix_step(model, params, ids)
  except ImportError:
    out["qwix_qlora"] = "not installed (pip install qwix==0.1.8)"
    print(f"{shape}: qwix not installed, its QLoRA skipped (pip install qwix==0.1.8)", flush=True)
  except ValueError as e:  # qwix tiles only contraction axes that are multiples of the tile
    out["qwix_qlora"] = f"qwix refuses this model: {e}"
  ref = None
  for name, (step, args, base_bytes) in variants.items():
    m = {"base_bytes": base_bytes, **memory(step, args)}
    out[name] = m
    ref = ref or m
    if name != "bf16_lora":
      for k in ("base_bytes", "temp_bytes", "peak_bytes"):
        m[f"{k}_over_bf16_lora"] = m[k] / ref[k]
  if not quick:
    times = interleaved_times({k: runner(s, a) for k, (s, a, _) in variants.items()}, rounds=rounds, warmup=warmup)
    for k, v in times.items():
      out[k]["step_s"] = median(v)
      if k != "bf16_lora":
        out[k]["step_over_bf16_lora"] = median(v) / median(times["bf16_lora"])
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="XLA memory only (no wall time)")
  ap.add_argument("--rounds", type=int, default=6)
  ap.add_argument("--shapes", default=None, help="comma-separated subset of anchor,weights (default: both; "
                                                 "with --smoke: anchor)")
  add_smoke_flag(ap)
  args = ap.parse_args(argv)
  shapes = [s for s in (args.shapes or ("anchor" if args.smoke else "anchor,weights")).split(",") if s]
  unknown = [s for s in shapes if s not in SHAPES]
  if unknown:
    ap.error(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
  timing = rounds_of(args, args.rounds)
  result = {name: bench(name, timing["rounds"], args.quick, warmup=timing["warmup"], smoke=args.smoke)
            for name in shapes}
  write_result("qlora" + ("_quick" if args.quick else ""), result, args=args)


if __name__ == "__main__":
  main()
