"""How a bank selects each example's adapter: gather vs one-hot einsum vs sort + ragged_dot.

One projection layer ``y = x·W0 + s_i·(x·A_i)·B_i`` (d=1024 -> 1024, r=8) on a batch of
64 rows, as served (decode: 1 token per row; prefill: 32 tokens per row) and trained
(loss + grad of the adapters, prefill shape), with ids per row ``(B,)`` or per token
``(B, T)`` spread over 1, 4, 16 and 64 slots. Each strategy is compared with the same
layer holding one plain adapter (``single``), side by side in one run: XLA FLOPs and
bytes accessed (deterministic) and wall-time ratios (interleaved, median of rounds).

  python benchmarks/bank_strategies.py            # results/bank_strategies.json
  python benchmarks/bank_strategies.py --smoke    # d=32, 4 rows, 2 slots, 1 and 4 tokens: does it still run?

The ``auto`` rule in ``jlora/multi/_select.py`` follows these numbers (docs/design.md).
"""

from __future__ import annotations

import argparse
import warnings

import jax
import jax.numpy as jnp

import jlora
from _common import add_smoke_flag, block, interleaved_times, median, rounds_of, write_result

warnings.filterwarnings("ignore")

D, OUT, RANK, BATCH = 1024, 1024, 8, 64
SMOKE_D, SMOKE_BATCH = 32, 4  # --smoke: d_in = d_out = 32, 4 rows


def layer(p, x):
  return x @ p["w"]


def cost(fn, *args):
  c = fn.lower(*args).compile().cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  return float(c["flops"]), float(c.get("bytes accessed", 0.0))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rounds", type=int, default=15)
  ap.add_argument("--slots", default=None, help="comma-separated slot counts (default: 1,4,16,64; with --smoke: 2)")
  ap.add_argument("--tokens", default=None, help="tokens per row (default: 1,32; with --smoke: 1,4)")
  add_smoke_flag(ap)
  args = ap.parse_args(argv)
  slots = args.slots or ("2" if args.smoke else "1,4,16,64")
  tokens = args.tokens or ("1,4" if args.smoke else "1,32")
  d, out, batch = (SMOKE_D, SMOKE_D, SMOKE_BATCH) if args.smoke else (D, OUT, BATCH)
  timing = rounds_of(args, args.rounds)
  key = jax.random.key(0)
  params = {"w": jax.random.normal(key, (d, out)) / 32}
  cfg = jlora.LoraConfig(rank=RANK, alpha=16, targets="w")

  def adapter(i):
    lp = jlora.init(jax.random.key(i + 1), params, cfg)
    w = lp["w"]
    return {"w": w.replace(b=jax.random.normal(jax.random.key(100 + i), w.b.shape) / 32)}

  single = adapter(0)
  wrapped = jlora.wrap(layer)
  rows = []
  for t in [int(s) for s in tokens.split(",")]:
    x = jax.random.normal(key, (batch, t, d))
    for n in [int(s) for s in slots.split(",")]:
      adapters = [adapter(i) for i in range(n)]
      for per in ("row", "token"):
        if per == "token" and t == 1:
          continue
        ids = (jnp.arange(batch) % n) if per == "row" else (jnp.arange(batch * t).reshape(batch, t) % n)
        fns = {"single": (jax.jit(wrapped), (single, x))}
        for strategy in ("gather", "onehot", "ragged"):
          bank = jlora.stack(adapters, strategy=strategy)
          fns[strategy] = (jax.jit(lambda b, x, ids: wrapped(b, x, adapter_ids=ids)), (bank, x, ids))
        row = {"tokens_per_row": t, "slots": n, "ids": per, "mode": "forward"}
        for name, (fn, a) in fns.items():
          row[f"{name}_flops"], row[f"{name}_bytes"] = cost(fn, *a)
        times = interleaved_times({k: (lambda fn=fn, a=a: block(fn(*a))) for k, (fn, a) in fns.items()},
                                  **timing)
        base_t = median(times["single"])
        for k in ("gather", "onehot", "ragged"):
          row[f"{k}_wall_over_single"] = round(median(times[k]) / base_t, 3)
          row[f"{k}_flops_over_single"] = round(row[f"{k}_flops"] / row["single_flops"], 3)
        row["single_wall_s"] = base_t
        print(row, flush=True)
        rows.append(row)
        if t > 1 and per == "row":  # training: loss + grad of the adapters
          def loss_fn(a, frozen, x, ids, bank):
            tree = jlora.combine(a, frozen)
            return jnp.mean(wrapped(tree, x, adapter_ids=ids) ** 2) if bank else jnp.mean(wrapped(tree, x) ** 2)

          tfns = {}
          a, fr = jlora.split(single)
          tfns["single"] = (jax.jit(jax.grad(lambda a, fr, x: loss_fn(a, fr, x, None, False))), (a, fr, x))
          for strategy in ("gather", "onehot", "ragged"):
            a, fr = jlora.split(jlora.stack(adapters, strategy=strategy))
            tfns[strategy] = (jax.jit(jax.grad(lambda a, fr, x, ids: loss_fn(a, fr, x, ids, True))), (a, fr, x, ids))
          trow = {"tokens_per_row": t, "slots": n, "ids": per, "mode": "grad"}
          for name, (fn, a) in tfns.items():
            trow[f"{name}_flops"], trow[f"{name}_bytes"] = cost(fn, *a)
          times = interleaved_times({k: (lambda fn=fn, a=a: block(fn(*a))) for k, (fn, a) in tfns.items()},
                                    **timing)
          base_t = median(times["single"])
          for k in ("gather", "onehot", "ragged"):
            trow[f"{k}_wall_over_single"] = round(median(times[k]) / base_t, 3)
            trow[f"{k}_flops_over_single"] = round(trow[f"{k}_flops"] / trow["single_flops"], 3)
          trow["single_wall_s"] = base_t
          print(trow, flush=True)
          rows.append(trow)
  write_result("bank_strategies", {"config": {"d_in": d, "d_out": out, "rank": RANK, "batch": batch},
                                   "rows": rows}, args=args)


if __name__ == "__main__":
  main()
