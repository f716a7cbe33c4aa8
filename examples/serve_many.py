"""Serving many adapters on one base: generation tokens/s for 64 rows spread over N adapters.

One batch of 64 prompts (16 tokens, 32 greedy new tokens, KV cache) generated with
``jlora.models.generate`` on the native decoder, row ``i`` with adapter ``i mod N`` of a bank
(``jlora.stack``, ``adapter_ids=``) for N = 1, 4, 16, 64, against the same batch with one
adapter (a plain LoRA tree, low-rank path) and with that adapter merged into the base (plain
weights: the floor). ``bank_16_onehot`` is the 16-adapter bank with the one-hot selection
instead of ``auto`` (= gather for per-row ids). The configurations are timed in interleaved
rounds (medians), so machine noise hits all alike; ratios are over ``single``. Before timing,
the rows of the 4-adapter batch are checked to equal each adapter generating alone.

Model: a random Llama (d=512, ffn 1376, 4 layers, 8 heads, vocab 1024; ``--bundled`` uses the
bundled tiny base instead), LoRA r=8, alpha 16 on all seven linear kinds, random non-zero B.

  python examples/serve_many.py            # writes benchmarks/results/serve_many.json
  python examples/serve_many.py --smoke    # tiny model, 8 rows over 1 and 4 adapters; writes only to --out
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

import jlora
import jlora.models

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from _common import LLAMA, SMOKE_LLAMA, add_smoke_flag, interleaved_times, median, rounds_of, write_result  # noqa: E402

ROWS, PROMPT, NEW, RANK, ALPHA = 64, 16, 32, 8, 16
COUNTS = (1, 4, 16, 64)
ONEHOT = 16  # the bank also timed with the one-hot selection
# --smoke: the same run on a tiny model, 8 rows over 1 and 4 adapters, 4 new tokens.
SMOKE = dict(llama=SMOKE_LLAMA, rows=8, prompt=4, new=4, counts=(1, 4), onehot=4)


def base_model(bundled: bool, llama: dict = LLAMA):
  if bundled:
    from jlora.finetune.config import DEFAULT_MODEL

    return jlora.models.load(DEFAULT_MODEL)
  model = jlora.models.Decoder(jlora.models.ModelConfig.from_hf({"model_type": "llama", **llama}))
  return model, jax.jit(model.init)(jax.random.key(0))


def make_adapters(model, params, n: int) -> list:
  cfg = jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=model.targets("all-linear"))

  @jax.jit
  def one(key):
    lp = jlora.init(key, params, cfg, layout=model.layout)
    return jax.tree.map(lambda w: w.replace(b=0.02 * jax.random.normal(jax.random.fold_in(key, 1), w.b.shape))
                        if isinstance(w, jlora.LoraWeight) else w, lp,
                        is_leaf=lambda w: isinstance(w, jlora.LoraWeight))

  return [one(jax.random.key(1 + i)) for i in range(n)]


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rounds", type=int, default=5, help="Timed rounds (each runs every configuration once).")
  ap.add_argument("--bundled", action="store_true", help="Use the bundled tiny base instead of the random Llama.")
  add_smoke_flag(ap)
  args = ap.parse_args(argv)
  sz = SMOKE if args.smoke else dict(llama=LLAMA, rows=ROWS, prompt=PROMPT, new=NEW, counts=COUNTS, onehot=ONEHOT)
  n_rows, new, counts, onehot = sz["rows"], sz["new"], sz["counts"], sz["onehot"]
  model, params = base_model(args.bundled, sz["llama"])
  adapters = make_adapters(model, params, max(counts))
  vocab = model.config.vocab_size
  prompts = np.asarray(jax.random.randint(jax.random.key(0), (n_rows, sz["prompt"]), 3, vocab))
  rows = np.arange(n_rows)

  def gen(p, **kw):
    return jlora.models.generate(model, p, prompts, max_new_tokens=new, eos_id=(), **kw)

  configs = {"merged": (jlora.merge(adapters[0]), {}), "single": (adapters[0], {})}
  for n in counts:
    configs[f"bank_{n}"] = (jlora.stack(adapters[:n]), {"adapter_ids": rows % n})
  configs[f"bank_{onehot}_onehot"] = (jlora.stack(adapters[:onehot], strategy="onehot"),
                                      {"adapter_ids": rows % onehot})

  # correctness first: each row of the 4-adapter batch is what its adapter generates alone
  mixed = gen(configs["bank_4"][0], **configs["bank_4"][1])
  for k in range(4):
    alone = gen(adapters[k])
    assert all(mixed[r] == alone[r] for r in rows[rows % 4 == k]), f"adapter {k}: batched rows differ"

  fns = {name: (lambda p=p, kw=kw: gen(p, **kw)) for name, (p, kw) in configs.items()}
  timing = rounds_of(args, args.rounds, warmup=1)
  times = interleaved_times(fns, **timing)  # generate returns host lists: synchronous
  t_single = median(times["single"])
  config = dict(sz["llama"]) if not args.bundled else {"model": "bundled tiny base"}
  result = {
      "command": "python examples/serve_many.py" + (" --bundled" if args.bundled else "")
                 + (" --smoke" if args.smoke else ""),
      "config": {**config, "rows": n_rows, "prompt_tokens": sz["prompt"], "new_tokens": new, "rank": RANK,
                 "alpha": ALPHA, "targets": "all-linear", "counts": list(counts), "rounds": timing["rounds"]},
      "generate_tokens_per_s": {k: round(n_rows * new / median(v), 1) for k, v in times.items()},
      "throughput_over_single": {k: round(t_single / median(v), 3) for k, v in times.items()},
      "seconds_median": {k: round(median(v), 4) for k, v in times.items()},
      "seconds_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
  }
  write_result("serve_many" + ("_bundled" if args.bundled else ""), result, args=args)


if __name__ == "__main__":
  main()
