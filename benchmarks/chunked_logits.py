"""An SFT train step with chunked logits (jlora.objectives.token_logprobs) against full logits: XLA memory and FLOPs.

The model is a Llama-style jlora.models.Decoder with a small hidden size (d=64, 2 layers, LoRA r=8 on
every linear layer) so that the output head dominates and compilation is cheap; the vocabulary is
32,000 (Llama 2), 128,256 (Llama 3) or 262,144 (Gemma 3), 2 sequences of T = 2,048 tokens. Shapes
are abstract (jax.ShapeDtypeStruct): nothing is allocated, XLA compiles the step and reports its
temp memory (memory_analysis) and FLOPs (cost_analysis).

Steps (loss + gradient w.r.t. the adapters + AdamW update, float32, every position supervised):

  full      the model's (B, T, V) logits, optax cross-entropy (as jlora.finetune's SFT task)
  chunked   token_logprobs on the hidden states, --chunk-size positions per block of logits
  trunk     the same step with a loss on the hidden states only (no head): what is not logits

"logits part" = temp − trunk's temp. FLOPs: XLA's cost model counts the body of a loop once,
whatever its trip count, so the chunked step's FLOPs are those of the same step compiled with a
single chunk of all B·T positions (``flops_one_chunk``: the same operations per position, every
one counted); the FLOPs XLA reports for the chunked loop itself are kept as ``flops_loop_body_once``.
Every position is supervised here, the chunked step's worst case: it computes the head only at
supervised positions, which the static cost model cannot see either.

  python benchmarks/chunked_logits.py                      # V = 32k, 128k, 262k; T = 2048
  python benchmarks/chunked_logits.py --chunk-size 256
  python benchmarks/chunked_logits.py --smoke              # tiny shapes, a few seconds: does it still run?

Results go to benchmarks/results/chunked_logits.json; --smoke writes none (unless --out).
"""

from __future__ import annotations

import argparse
import functools
import json
import warnings

import jax
import jax.numpy as jnp
import optax

import jlora
from _common import write_result
from jlora import objectives
from jlora.models import Decoder, ModelConfig

warnings.filterwarnings("ignore")

VOCABS = (32_000, 128_256, 262_144)
SMOKE_VOCABS = (96,)


def model_for(vocab: int, *, smoke: bool) -> Decoder:
  d = 32 if smoke else 64
  return Decoder(ModelConfig.from_hf({"model_type": "llama", "vocab_size": vocab, "hidden_size": d,
                                      "intermediate_size": 2 * d, "num_hidden_layers": 2, "num_attention_heads": 4,
                                      "max_position_embeddings": 4096}),
                 unroll_layers=True)  # XLA's cost model counts a loop body once: no layer loop


def abstract_lora(model: Decoder):
  cfg = jlora.LoraConfig(rank=8, alpha=16, targets=model.targets("all-linear"))
  return jax.eval_shape(lambda k: jlora.init(k, model.init(k), cfg, layout=model.layout), jax.random.key(0))


def sft_losses(model: Decoder, chunk_size: int):
  """``{name: loss(params, batch) -> (total, count)}`` for the three steps."""
  wrapped_hidden = jlora.wrap(model.hidden_states)
  wrapped_logits = jlora.wrap(model)

  def full(params, batch):
    logits = wrapped_logits(params, batch["ids"])[:, :-1].astype(jnp.float32)
    mask = batch["loss_mask"][:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["ids"][:, 1:])
    return jnp.sum(ce * mask), jnp.sum(mask)

  def chunked(params, batch):
    labels = objectives.next_token_labels(batch["ids"], batch["loss_mask"])
    tok = objectives.token_logprobs(wrapped_hidden(params, batch["ids"]), model.head(params), labels,
                                    chunk_size=chunk_size)
    return -jnp.sum(tok), jnp.sum(labels >= 0)

  def trunk(params, batch):
    h = wrapped_hidden(params, batch["ids"]).astype(jnp.float32)
    return jnp.sum(h * h), jnp.sum(batch["loss_mask"])

  return {"full": full, "chunked": chunked, "trunk": trunk}


def train_step(loss, tx):
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(adapters, opt_state, frozen, batch):
    def mean_loss(a):
      total, count = loss(jlora.combine(a, frozen), batch)
      return total / jnp.maximum(count, 1)

    value, g = jax.value_and_grad(mean_loss)(adapters)
    u, opt_state = tx.update(g, opt_state, adapters)
    return optax.apply_updates(adapters, u), opt_state, value

  return step


def analyse(step, args) -> dict:
  compiled = step.lower(*args).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
          "flops": float(cost["flops"])}


def run_vocab(vocab: int, *, batch: int, seq: int, chunk_size: int, smoke: bool) -> dict:
  model = model_for(vocab, smoke=smoke)
  adapters, frozen = jlora.split(abstract_lora(model))
  tx = jlora.optimizer(optax.adamw(1e-4), adapters)
  opt_state = jax.eval_shape(tx.init, adapters)
  data = {"ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32), "loss_mask": jax.ShapeDtypeStruct((batch, seq),
                                                                                                   jnp.int32)}
  args = (adapters, opt_state, frozen, data)
  n = batch * seq
  out = {name: analyse(train_step(loss, tx), args) for name, loss in sft_losses(model, chunk_size).items()}
  one_chunk = out["chunked"] if chunk_size >= n else analyse(train_step(sft_losses(model, n)["chunked"], tx), args)
  out["chunked"]["flops_loop_body_once"] = out["chunked"]["flops"]
  out["chunked"]["flops"] = out["chunked"]["flops_one_chunk"] = one_chunk["flops"]
  trunk = out["trunk"]["temp_bytes"]
  for name in ("full", "chunked"):
    out[name]["logits_part_bytes"] = out[name]["temp_bytes"] - trunk
  ratio = lambda a, b: a / b if b else float("nan")
  out["ratios"] = {
      "chunked/full temp": ratio(out["chunked"]["temp_bytes"], out["full"]["temp_bytes"]),
      "chunked/full logits part": ratio(out["chunked"]["logits_part_bytes"], out["full"]["logits_part_bytes"]),
      "chunked/full flops": ratio(out["chunked"]["flops"], out["full"]["flops"]),
  }
  out["reference_sizes"] = {
      "float32 logits (B, T, V) bytes": 4 * n * vocab,
      "float32 chunk (chunk_size, V) bytes": 4 * min(chunk_size, n) * vocab,
  }
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--vocabs", default=None, help=f"comma-separated vocabulary sizes (default: {VOCABS})")
  p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; --smoke: 16)")
  p.add_argument("--batch", type=int, default=2, help="sequences per step")
  p.add_argument("--chunk-size", type=int, default=1024, help="positions per block of logits (token_logprobs)")
  p.add_argument("--smoke", action="store_true", help="tiny shapes: checks that the benchmark runs, writes no result")
  p.add_argument("--out", default=None, help="write the result JSON here")
  a = p.parse_args(argv)
  vocabs = tuple(int(v) for v in a.vocabs.split(",")) if a.vocabs else (SMOKE_VOCABS if a.smoke else VOCABS)
  seq = a.seq or (16 if a.smoke else 2048)
  chunk = min(a.chunk_size, 8) if a.smoke else a.chunk_size
  result = {"config": {"batch": a.batch, "seq": seq, "chunk_size": chunk, "hidden_size": 32 if a.smoke else 64,
                       "layers": 2, "rank": 8, "dtype": "float32", "supervised": "every position"},
            "vocab": {str(v): run_vocab(v, batch=a.batch, seq=seq, chunk_size=chunk, smoke=a.smoke) for v in vocabs}}
  for v, r in result["vocab"].items():
    print(f"V={v:>7}: temp full {r['full']['temp_bytes'] / 2**20:9.1f} MiB, chunked "
          f"{r['chunked']['temp_bytes'] / 2**20:8.1f} MiB (trunk {r['trunk']['temp_bytes'] / 2**20:.1f}); logits part "
          f"{r['full']['logits_part_bytes'] / 2**20:.1f} -> {r['chunked']['logits_part_bytes'] / 2**20:.1f} MiB; "
          f"FLOPs chunked/full {r['ratios']['chunked/full flops']:.4f}")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(result, f, indent=2)
  elif not a.smoke:
    write_result("chunked_logits", result)
  return result


if __name__ == "__main__":
  main()
