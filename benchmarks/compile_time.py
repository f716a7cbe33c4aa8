"""Compile time of a LoRA train step vs full fine-tuning, at 4, 16 and 32 layers.

``jlora.wrap`` traces the model to a jaxpr and re-evaluates it with the low-rank path, and the
LoRA step's program holds the adapters' own matmuls: tracing, lowering and XLA compilation
of the whole jitted train step (loss + grad + AdamW, donated buffers) are timed, per layer
count, with fresh functions each time (no cache hits), alternating the steps:

* ``unrolled``: a Hugging Face Flax Llama (d=512, ffn 1376, 8 heads, vocab 1024; its layers
  are unrolled Python modules, no scan) with LoRA r=8 on all 7 linear kinds: full
  fine-tuning, jlora, jlora's plain-autodiff lowering (``fused_expansion=False``), and qwix
  0.1.8's LoRA (the peer, which adds ``x·A·B`` inside each Flax module and lets JAX
  differentiate it: the plainest LoRA program) when installed;
* ``scanned``: ``jlora.models``' decoder of the same shape (layers under ``jax.lax.scan``):
  full fine-tuning and jlora;
* ``moe``: ``jlora.models``' Qwen3-MoE decoder of the same attention shape, every layer 8
  routed experts (top-2, expert width 344) in sorted dispatch (one ``jax.lax.ragged_dot`` per
  expert projection, the TPU/GPU path), LoRA on attention and the routed experts (never the
  router): full fine-tuning and jlora. Written to ``compile_time_moe.json`` when run alone.

  python benchmarks/compile_time.py                 # 4, 16 and 32 layers, 2 repeats (minimum kept)
  python benchmarks/compile_time.py --layers 4,16 --repeats 1 --models unrolled
  python benchmarks/compile_time.py --models moe --layers 4,16,32 --repeats 3
  python benchmarks/compile_time.py --smoke         # tiny model, 1 layer, 1 repeat: does it still run?

Results go to benchmarks/results/compile_time.json (--smoke: nowhere, unless --out).
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax
import jax.numpy as jnp
import optax

import jlora
from _common import ALL_LINEAR, ALPHA, LLAMA, RANK, add_smoke_flag, shape_of, write_result

warnings.filterwarnings("ignore")


def loss_of(logits, ids):
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()


def build(layers: int, *, llama: dict = LLAMA, batch: int = 4, seq: int = 256):
  """Fresh (never traced) full fine-tuning and LoRA train steps with their arguments."""
  import transformers

  model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**{**llama, "num_hidden_layers": layers}),
                                            seed=0, _do_init=True)
  params = model.params
  ids = jnp.zeros((batch, seq), jnp.int32)
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

  def make_lora(lowering=None):
    wrapped = jlora.wrap(lambda p, ids: model(ids, params=p).logits, fused_expansion=lowering)

    def lora_step(adapters, opt_state, frozen, ids):
      loss, g = jax.value_and_grad(lambda a: loss_of(wrapped(jlora.combine(a, frozen), ids), ids))(adapters)
      u, opt_state = ltx.update(g, opt_state, adapters)
      return optax.apply_updates(adapters, u), opt_state, loss

    return lora_step, (adapters, ltx.init(adapters), frozen, ids)

  def make_qwix():
    from train_step import qwix_step

    return qwix_step(model, ids)

  return {"full": make_full, "jlora": make_lora, "jlora_autodiff": lambda: make_lora(False), "qwix": make_qwix}


def build_scanned(layers: int, *, llama: dict = LLAMA, batch: int = 4, seq: int = 256, moe: bool = False):
  """The same steps on ``jlora.models``' scanned decoder, from abstract shapes (nothing runs).

  ``moe``: a Qwen3-MoE decoder (8 routed experts of width ``intermediate_size // 4``, top-2, every
  layer sparse) in sorted (``ragged_dot``) dispatch.
  """
  import jlora.models

  hf = {"model_type": "llama", **llama, "num_hidden_layers": layers, "tie_word_embeddings": False}
  if moe:
    hf.update(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
              moe_intermediate_size=llama["intermediate_size"] // 4,
              head_dim=llama["hidden_size"] // llama["num_attention_heads"])
  model = jlora.models.Decoder(jlora.models.ModelConfig.from_hf(hf), moe_dispatch="ragged" if moe else "auto")
  shapes = model.shapes()
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  tx = optax.adamw(1e-4, weight_decay=0.01)
  fwd = lambda p, ids: model(p, ids)

  def make_full():
    def full_step(params, opt_state, ids):
      loss, g = jax.value_and_grad(lambda p: loss_of(fwd(p, ids), ids))(params)
      u, opt_state = tx.update(g, opt_state, params)
      return optax.apply_updates(params, u), opt_state, loss

    return full_step, (shapes, jax.eval_shape(tx.init, shapes), ids)

  cfg = jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=model.targets("all-linear"))
  lp = jax.eval_shape(lambda p: jlora.init(jax.random.key(1), p, cfg, layout=model.layout), shapes)
  adapters, frozen = jlora.split(lp)
  ltx = jlora.optimizer(tx, adapters)

  def make_lora():
    wrapped = jlora.wrap(fwd)

    def lora_step(adapters, opt_state, frozen, ids):
      loss, g = jax.value_and_grad(lambda a: loss_of(wrapped(jlora.combine(a, frozen), ids), ids))(adapters)
      u, opt_state = ltx.update(g, opt_state, adapters)
      return optax.apply_updates(adapters, u), opt_state, loss

    return lora_step, (adapters, jax.eval_shape(ltx.init, adapters), frozen, ids)

  return {"full": make_full, "jlora": make_lora}


def timed(make) -> dict:
  step, args = make()
  if not hasattr(step, "trace"):  # qwix's step comes jitted already
    step = jax.jit(step, donate_argnums=(0, 1))
  t0 = time.perf_counter()
  traced = step.trace(*args)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  lowered.compile()
  t3 = time.perf_counter()
  return {"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2, "total_s": t3 - t0}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--layers", default=None, help="comma-separated layer counts (default: 4,16,32; with --smoke: 1)")
  ap.add_argument("--repeats", type=int, default=None,
                  help="measurements per step and layer count (minimum kept; default: 2, with --smoke: 1)")
  ap.add_argument("--models", default="unrolled,scanned",
                  help="unrolled (HF Flax Llama), scanned (jlora.models) and/or moe (jlora.models' Qwen3-MoE)")
  add_smoke_flag(ap)
  args = ap.parse_args(argv)
  layer_counts = args.layers or ("1" if args.smoke else "4,16,32")
  repeats = args.repeats or (1 if args.smoke else 2)
  shape = shape_of(args, llama=LLAMA, batch=4, seq=256)
  try:
    import qwix  # noqa: F401
    have_qwix = True
  except ImportError:
    have_qwix = False
    print("qwix not installed: its step is skipped (pip install qwix==0.1.8)", flush=True)
  result = {"model": {**shape["llama"], "batch": shape["batch"], "seq": shape["seq"], "rank": RANK,
                      "targets": ALL_LINEAR}}
  for kind in [k for k in args.models.split(",") if k]:
    result[kind] = {}
    for layers in [int(x) for x in layer_counts.split(",") if x]:
      makers = build(layers, **shape) if kind == "unrolled" else build_scanned(layers, **shape, moe=kind == "moe")
      if kind == "unrolled" and not have_qwix:
        makers.pop("qwix")
        result["qwix"] = "not installed (pip install qwix==0.1.8)"
      runs = {name: [] for name in makers}
      for _ in range(repeats):  # alternate, so that machine noise hits all alike
        for name, make in makers.items():
          runs[name].append(timed(make))
      best = {k: min(v, key=lambda r: r["total_s"]) for k, v in runs.items()}
      for name in list(makers):
        if name != "full":
          best[f"{name}_over_full"] = best[name]["total_s"] / best["full"]["total_s"]
      if "qwix" in best:
        best["jlora_over_qwix"] = best["jlora"]["total_s"] / best["qwix"]["total_s"]
      best["all_runs"] = runs
      result[kind][str(layers)] = best
      print(f"{kind}, {layers} layers: " + ", ".join(f"{n} {best[n]['total_s']:.1f}s" for n in makers)
            + ", " + ", ".join(f"{k} {v:.2f}" for k, v in best.items() if k.endswith(("_over_full", "_over_qwix"))),
            flush=True)
  kinds = [k for k in args.models.split(",") if k]
  write_result("compile_time_moe" if kinds == ["moe"] else "compile_time", result, args=args)


if __name__ == "__main__":
  main()
