"""How a bank selects each example's adapter: gather vs one-hot einsum vs sort + ragged_dot.

One projection layer ``y = x·W0 + s_i·(x·A_i)·B_i`` (d=1024 -> 1024, r=8) on a batch of
64 rows, as served (decode: 1 token per row; prefill: 32 tokens per row) and trained
(loss + grad of the adapters, prefill shape), with ids per row ``(B,)`` or per token
``(B, T)`` spread over 1, 4, 16 and 64 slots. Each strategy is compared with the same
layer holding one plain adapter (``single``), side by side in one run: XLA FLOPs and
bytes accessed (deterministic) and wall-time ratios (interleaved, median of rounds).

  python benchmarks/bank_strategies.py            # results/bank_strategies.json

The ``auto`` rule in ``jlora/multi/_select.py`` follows these numbers (docs/design.md).
"""

from __future__ import annotations

import argparse
import warnings

import jax
import jax.numpy as jnp

import jlora
from _common import block, interleaved_times, median, write_result

warnings.filterwarnings("ignore")

D, OUT, RANK, BATCH = 1024, 1024, 8, 64


def layer(p, x):
  return x @ p["w"]


def cost(fn, *args):
  c = fn.lower(*args).compile().cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  return float(c["flops"]), float(c.get("bytes accessed", 0.0))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rounds", type=int, default=15)
  ap.add_argument("--slots", default="1,4,16,64")
  ap.add_argument("--tokens", default="1,32", help="tokens per row")
  args = ap.parse_args()
  key = jax.random.key(0)
  params = {"w": jax.random.normal(key, (D, OUT)) / 32}
  cfg = jlora.LoraConfig(rank=RANK, alpha=16, targets="w")

  def adapter(i):
    lp = jlora.init(jax.random.key(i + 1), params, cfg)
    w = lp["w"]
    return {"w": w.replace(b=jax.random.normal(jax.random.key(100 + i), w.b.shape) / 32)}

  single = adapter(0)
  wrapped = jlora.wrap(layer)
  rows = []
  for t in [int(s) for s in args.tokens.split(",")]:
    x = jax.random.normal(key, (BATCH, t, D))
    for n in [int(s) for s in args.slots.split(",")]:
      adapters = [adapter(i) for i in range(n)]
      for per in ("row", "token"):
        if per == "token" and t == 1:
          continue
        ids = (jnp.arange(BATCH) % n) if per == "row" else (jnp.arange(BATCH * t).reshape(BATCH, t) % n)
        fns = {"single": (jax.jit(wrapped), (single, x))}
        for strategy in ("gather", "onehot", "ragged"):
          bank = jlora.stack(adapters, strategy=strategy)
          fns[strategy] = (jax.jit(lambda b, x, ids: wrapped(b, x, adapter_ids=ids)), (bank, x, ids))
        row = {"tokens_per_row": t, "slots": n, "ids": per, "mode": "forward"}
        for name, (fn, a) in fns.items():
          row[f"{name}_flops"], row[f"{name}_bytes"] = cost(fn, *a)
        times = interleaved_times({k: (lambda fn=fn, a=a: block(fn(*a))) for k, (fn, a) in fns.items()},
                                  rounds=args.rounds)
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
                                    rounds=args.rounds)
          base_t = median(times["single"])
          for k in ("gather", "onehot", "ragged"):
            trow[f"{k}_wall_over_single"] = round(median(times[k]) / base_t, 3)
            trow[f"{k}_flops_over_single"] = round(trow[f"{k}_flops"] / trow["single_flops"], 3)
          trow["single_wall_s"] = base_t
          print(trow, flush=True)
          rows.append(trow)
  write_result("bank_strategies", {"config": {"d_in": D, "d_out": OUT, "rank": RANK, "batch": BATCH},
                                   "rows": rows})


if __name__ == "__main__":
  main()
