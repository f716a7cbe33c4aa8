"""Compile time of a LoRA train step vs full fine-tuning on unrolled models of 4, 16, 32 layers.

``jlora.wrap`` traces the model to a jaxpr and re-evaluates it with the low-rank path, and the
LoRA step's program holds the adapters' own matmuls: tracing, lowering and XLA compilation
of the whole jitted train step (loss + grad + AdamW) are timed for both, per layer count,
with fresh functions each time (no cache hits), alternating the two. The model is a Hugging
Face Flax Llama (d=512, ffn 1376, 8 heads, vocab 1024; its layers are unrolled Python
modules, no scan) with LoRA r=8 on all 7 linear kinds.

  python benchmarks/compile_time.py                 # 4, 16 and 32 layers, 2 repeats (minimum kept)
  python benchmarks/compile_time.py --layers 4,16 --repeats 1

Results go to benchmarks/results/compile_time.json.
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax
import jax.numpy as jnp
import optax

import jlora
from _common import ALL_LINEAR, ALPHA, LLAMA, RANK, write_result

warnings.filterwarnings("ignore")


def loss_of(logits, ids):
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()


def build(layers: int):
  """Fresh (never traced) full fine-tuning and LoRA train steps with their arguments."""
  import transformers

  model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, "num_hidden_layers": layers}),
                                            seed=0, _do_init=True)
  params = model.params
  ids = jnp.zeros((4, 256), jnp.int32)
  tx = optax.adamw(1e-4, weight_decay=0.01)

  def make_full():
    fwd = lambda p, ids: model(ids, params=p).logits

    def full_step(params, opt_state, ids):
      loss, g = jax.value_and_grad(lambda p: loss_of(fwd(p, ids), ids))(params)
      u, opt_state = tx.update(g, opt_state, params)
      return optax.apply_updates(params, u), opt_state, loss

    return full_step, (params, tx.init(params), ids)

  cfg = jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=rf".*/({'|'.join(ALL_LINEAR)})/kernel")
  adapters, frozen = jlora.split(jlora.init(jax.random.key(1), params, cfg))
  ltx = jlora.optimizer(tx, adapters)

  def make_lora():
    wrapped = jlora.wrap(lambda p, ids: model(ids, params=p).logits)

    def lora_step(adapters, opt_state, frozen, ids):
      loss, g = jax.value_and_grad(lambda a: loss_of(wrapped(jlora.combine(a, frozen), ids), ids))(adapters)
      u, opt_state = ltx.update(g, opt_state, adapters)
      return optax.apply_updates(adapters, u), opt_state, loss

    return lora_step, (adapters, ltx.init(adapters), frozen, ids)

  return make_full, make_lora


def timed(make) -> dict:
  step, args = make()
  t0 = time.perf_counter()
  traced = jax.jit(step, donate_argnums=(0, 1)).trace(*args)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  lowered.compile()
  t3 = time.perf_counter()
  return {"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2, "total_s": t3 - t0}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--layers", default="4,16,32", help="comma-separated layer counts")
  ap.add_argument("--repeats", type=int, default=2, help="measurements per step and layer count (minimum kept)")
  args = ap.parse_args()
  result = {"model": {**LLAMA, "batch": 4, "seq": 256, "rank": RANK, "targets": ALL_LINEAR}, "layers": {}}
  for layers in [int(x) for x in args.layers.split(",") if x]:
    make_full, make_lora = build(layers)
    runs = {"full": [], "jlora": []}
    for _ in range(args.repeats):  # alternate, so that machine noise hits both alike
      runs["full"].append(timed(make_full))
      runs["jlora"].append(timed(make_lora))
    best = {k: min(v, key=lambda r: r["total_s"]) for k, v in runs.items()}
    best["jlora_over_full"] = best["jlora"]["total_s"] / best["full"]["total_s"]
    best["all_runs"] = runs
    result["layers"][str(layers)] = best
    print(f"{layers} layers: full {best['full']['total_s']:.1f}s, jlora {best['jlora']['total_s']:.1f}s, "
          f"ratio {best['jlora_over_full']:.2f}", flush=True)
  write_result("compile_time", result)


if __name__ == "__main__":
  main()
