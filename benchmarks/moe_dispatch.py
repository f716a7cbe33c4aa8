"""Mixture-of-experts dispatch on this backend: sorted ``ragged_dot`` vs dense experts; compile time vs depth.

``jlora.models.Decoder(config, moe_dispatch=...)`` runs a MoE layer's experts either sorted by
expert with one ``jax.lax.ragged_dot`` per projection (``"ragged"``) or every expert on every
token with the expert axis as a batch axis (``"dense"``); both are dropless. This measures both,
side by side in one process, on two tiny MoE decoders with the routing of their families:

* ``qwen3_moe``: Qwen3-MoE-shaped (16 experts, top-4, norm_topk_prob, q/k norm), d=256,
  expert width 128, 2 layers;
* ``mixtral``: Mixtral-shaped (8 experts, top-2), d=256, expert width 512, 2 layers;

batch 4 x 128 tokens, float32. For each dispatch: XLA's FLOPs (``cost_analysis``) of the
forward pass and of a LoRA train step (r=8 on the attention projections: the gradient flows
through the experts to the layers below), and their wall times, interleaved round robin. The
FLOPs come from the same programs with the layers unrolled (XLA's cost analysis counts a
loop body once); the times are those of the default, scanned programs.
``grouped_ideal_expert_flops_forward`` is what a real grouped kernel would spend on the
experts' matmuls in the forward pass (each token through its k experts only).

Then the compile time of a Qwen3-MoE-shaped model (its default dispatch) at 2, 8 and 16
layers: trace + XLA compilation of the forward pass and of the attention-LoRA train step,
from abstract shapes, fresh functions each time, the depths alternating over ``--repeats``
rounds (the minimum kept; layers under ``lax.scan``: flat in depth).

  python benchmarks/moe_dispatch.py                # both models, 5 rounds; compile time at 2, 8, 16 layers
  python benchmarks/moe_dispatch.py --rounds 3 --repeats 1
  python benchmarks/moe_dispatch.py --smoke        # tiny shapes, 1 round, 1 and 2 layers: does it still run?

Results go to benchmarks/results/moe_dispatch.json (--smoke: nowhere, unless --out).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
import warnings

import jax
import jax.numpy as jnp
import optax

import jlora
import jlora.models
from jlora.models.moe import resolve_dispatch
from _common import add_smoke_flag, block, interleaved_times, median, rounds_of, write_result

warnings.filterwarnings("ignore")

COMMON = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=64, max_position_embeddings=512, tie_word_embeddings=False)
MODELS = {
    "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=512, moe_intermediate_size=128, num_experts=16,
                      num_experts_per_tok=4, norm_topk_prob=True, **COMMON),
    "mixtral": dict(model_type="mixtral", intermediate_size=512, num_local_experts=8, num_experts_per_tok=2, **COMMON),
}
BATCH, SEQ, RANK = 4, 128, 8
DEPTHS = (2, 8, 16)
SMOKE = dict(vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_attention_heads=2,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=32)
SMOKE_BATCH, SMOKE_SEQ, SMOKE_DEPTHS = 2, 8, (1, 2)


def config(name: str, smoke: bool, layers: int | None = None) -> jlora.models.ModelConfig:
  hf = {**MODELS[name], **(SMOKE if smoke else {})}
  if layers is not None:
    hf["num_hidden_layers"] = layers
  return jlora.models.ModelConfig.from_hf(hf)


def loss_of(logits, ids):
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()


def lora_step(model, lora_params):
  """A jitted LoRA train step (loss + grad w.r.t. the adapters + AdamW) and its arguments."""
  adapters, frozen = jlora.split(lora_params)
  tx = jlora.optimizer(optax.adamw(1e-4), adapters)
  wrapped = jlora.wrap(model)

  @jax.jit
  def step(adapters, opt_state, frozen, ids):
    loss, g = jax.value_and_grad(lambda a: loss_of(wrapped(jlora.combine(a, frozen), ids), ids))(adapters)
    u, opt_state = tx.update(g, opt_state, adapters)
    return optax.apply_updates(adapters, u), opt_state, loss

  abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(adapters))
  return step, [adapters, jax.eval_shape(tx.init, adapters) if abstract else tx.init(adapters), frozen]


def attention_lora(model, params):
  cfg = jlora.LoraConfig(rank=RANK, alpha=2 * RANK, targets=model.targets("q_proj,k_proj,v_proj,o_proj"))
  return jlora.init(jax.random.key(1), params, cfg, layout=model.layout)


def flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def grouped_ideal_flops(cfg: jlora.models.ModelConfig, tokens: int) -> float:
  """Expert-matmul FLOPs of a grouped kernel: each token through its k experts only (3 projections)."""
  return 2.0 * 3 * tokens * cfg.num_experts_per_tok * cfg.hidden_size * cfg.moe_intermediate_size * sum(
      cfg.moe_layers)


def dispatch_comparison(name: str, *, smoke: bool, batch: int, seq: int, rounds: dict) -> dict:
  cfg = config(name, smoke)
  params = jax.jit(jlora.models.Decoder(cfg).init)(jax.random.key(0))
  ids = jax.random.randint(jax.random.key(2), (batch, seq), 0, cfg.vocab_size)
  out = {"config": {**MODELS[name], **(SMOKE if smoke else {}), "batch": batch, "seq": seq},
         "grouped_ideal_expert_flops_forward": grouped_ideal_flops(cfg, batch * seq)}
  fns, logits = {}, {}
  for dispatch in ("ragged", "dense"):
    model = jlora.models.Decoder(cfg, moe_dispatch=dispatch)
    unrolled = jlora.models.Decoder(cfg, moe_dispatch=dispatch, unroll_layers=True)
    t0 = time.perf_counter()
    compiled = jax.jit(model.__call__).lower(params, ids).compile()
    compile_s = time.perf_counter() - t0
    step, args = lora_step(model, attention_lora(model, params))
    step_compiled = step.lower(*args, ids).compile()
    ustep, uargs = lora_step(unrolled, attention_lora(unrolled, params))
    out[dispatch] = {"forward_flops": flops(jax.jit(unrolled.__call__).lower(params, ids).compile()),
                     "forward_compile_s": round(compile_s, 3),
                     "lora_step_flops": flops(ustep.lower(*uargs, ids).compile())}
    logits[dispatch] = compiled(params, ids)
    state = list(args)

    def run_step(step_compiled=step_compiled, state=state):
      a, o, loss = step_compiled(*state, ids)
      state[0], state[1] = a, o
      block(loss)

    fns[f"{dispatch}_forward"] = functools.partial(lambda c: block(c(params, ids)), compiled)
    fns[f"{dispatch}_lora_step"] = run_step
  diff = float(jnp.abs(logits["ragged"] - logits["dense"]).max() / jnp.abs(logits["dense"]).max())
  assert diff < 1e-4, f"{name}: the dispatches disagree ({diff:.2e} of the logit scale)"
  times = interleaved_times(fns, **rounds)
  for dispatch in ("ragged", "dense"):
    for what in ("forward", "lora_step"):
      out[dispatch][f"{what}_s"] = round(median(times[f"{dispatch}_{what}"]), 5)
  out["ragged_over_dense"] = {
      "forward_flops": round(out["ragged"]["forward_flops"] / out["dense"]["forward_flops"], 3),
      "forward_time": round(out["ragged"]["forward_s"] / out["dense"]["forward_s"], 3),
      "lora_step_flops": round(out["ragged"]["lora_step_flops"] / out["dense"]["lora_step_flops"], 3),
      "lora_step_time": round(out["ragged"]["lora_step_s"] / out["dense"]["lora_step_s"], 3)}
  out["logits_max_rel_diff"] = diff
  print(name, json.dumps(out["ragged_over_dense"]), flush=True)
  return out


def compile_once(depth: int, *, smoke: bool, batch: int, seq: int) -> dict:
  """Trace and compile times of a fresh forward and attention-LoRA step at ``depth`` layers."""
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  model = jlora.models.Decoder(config("qwen3_moe", smoke, depth))
  shapes = model.shapes()
  r = {}
  t0 = time.perf_counter()
  lowered = jax.jit(lambda p, x: model(p, x)).lower(shapes, ids)
  t1 = time.perf_counter()
  lowered.compile()
  r["forward_trace_s"], r["forward_compile_s"] = t1 - t0, time.perf_counter() - t1
  step, args = lora_step(model, jax.eval_shape(lambda p: attention_lora(model, p), shapes))
  t0 = time.perf_counter()
  lowered = step.lower(*args, ids)
  t1 = time.perf_counter()
  lowered.compile()
  r["lora_step_trace_s"], r["lora_step_compile_s"] = t1 - t0, time.perf_counter() - t1
  r["forward_total_s"] = r["forward_trace_s"] + r["forward_compile_s"]
  r["lora_step_total_s"] = r["lora_step_trace_s"] + r["lora_step_compile_s"]
  return r


def compile_vs_depth(*, smoke: bool, batch: int, seq: int, depths, repeats: int) -> dict:
  runs = {d: [] for d in depths}
  for rep in range(repeats):  # alternate the order, so that machine noise hits every depth alike
    for depth in (depths if rep % 2 == 0 else depths[::-1]):
      runs[depth].append(compile_once(depth, smoke=smoke, batch=batch, seq=seq))
  out = {}
  for depth in depths:
    r = {k: round(min(run[k] for run in runs[depth]), 3) for k in runs[depth][0]}
    out[f"layers_{depth}"] = r
    print("layers", depth, r, flush=True)
  first, last = out[f"layers_{depths[0]}"], out[f"layers_{depths[-1]}"]
  out[f"forward_{depths[-1]}_over_{depths[0]}"] = round(last["forward_total_s"] / first["forward_total_s"], 3)
  out[f"lora_step_{depths[-1]}_over_{depths[0]}"] = round(last["lora_step_total_s"] / first["lora_step_total_s"], 3)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rounds", type=int, default=5, help="timed rounds of the dispatch comparison")
  ap.add_argument("--repeats", type=int, default=2, help="compilations per depth (the minimum is kept)")
  add_smoke_flag(ap)
  args = ap.parse_args(argv)
  batch, seq = (SMOKE_BATCH, SMOKE_SEQ) if args.smoke else (BATCH, SEQ)
  rounds = rounds_of(args, args.rounds, warmup=1)
  result = {"backend": jax.default_backend(),
            "auto_picks": resolve_dispatch("auto"),
            "dispatch": {name: dispatch_comparison(name, smoke=args.smoke, batch=batch, seq=seq, rounds=rounds)
                         for name in MODELS},
            "compile_time": compile_vs_depth(smoke=args.smoke, batch=batch, seq=seq,
                                             depths=SMOKE_DEPTHS if args.smoke else DEPTHS,
                                             repeats=1 if args.smoke else args.repeats)}
  write_result("moe_dispatch", result, args=args)


if __name__ == "__main__":
  main()
