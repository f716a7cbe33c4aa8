"""What `--reproducible` (pinned XLA:CPU numerics) costs: the bundled run's train step, pinned vs not.

XLA flags are per process, so two worker processes each compile the default
command's train step (bundled tiny model, batch 16 x 48 tokens, LoRA r=8 on all
linear layers) once, one with ``jlora.finetune.numerics.pin()`` and one without;
the parent then asks them in turn to run ``--steps`` steps, so that machine noise
hits both alike, and reports the median time per step and the ratio.

  python benchmarks/reproducible_numerics.py [--rounds 7] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))


def worker(pinned: bool) -> None:
  if pinned:
    from jlora.finetune import numerics

    print(numerics.pin(), file=sys.stderr, flush=True)
  import time

  import jax

  import jlora
  from jlora.finetune import data as data_lib
  from jlora.finetune import model as model_lib
  from jlora.finetune.config import TrainConfig
  from jlora.finetune.train import make_optimizer, make_train_step

  cfg = TrainConfig()
  loaded = model_lib.load(cfg.model_dir)
  records, _ = data_lib.load_records(cfg.data_path)
  tok = data_lib.tokenize(records, loaded.tokenizer, max_len=cfg.max_seq_len)
  batches = data_lib.Batches(tok, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, seed=cfg.seed)
  ids, mask = model_lib.example_inputs(loaded.tokenizer)
  layout = jlora.infer_layout(loaded.forward, loaded.params, ids, mask)
  lora_cfg = jlora.LoraConfig(rank=cfg.rank, alpha=cfg.alpha, targets=model_lib.resolve_targets(cfg.targets, layout))
  adapters, frozen = jlora.split(jlora.init(jax.random.key(0), loaded.params, lora_cfg, layout=layout))
  tx = jlora.optimizer(make_optimizer(cfg, 561), adapters)
  opt_state = tx.init(adapters)
  step_fn = make_train_step(loaded.forward, tx, remat=False, use_dropout=False)
  key = jax.random.key(0)
  step = 0
  for line in sys.stdin:
    n = int(line)
    t0 = time.perf_counter()
    for _ in range(n):
      batch = jax.tree.map(jax.numpy.asarray, batches.get(step))
      adapters, opt_state, loss, _ = step_fn(adapters, opt_state, frozen, batch, key)
      step += 1
    loss.block_until_ready()
    print((time.perf_counter() - t0) / n, flush=True)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--steps", type=int, default=20, help="steps per measurement")
  ap.add_argument("--worker", choices=["pinned", "default"], help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    worker(args.worker == "pinned")
    return
  from _common import median, write_result

  env = {**os.environ, "XLA_FLAGS": ""}
  procs = {name: subprocess.Popen([sys.executable, __file__, "--worker", name], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
           for name in ("default", "pinned")}

  def measure(name: str) -> float:
    procs[name].stdin.write(f"{args.steps}\n")
    procs[name].stdin.flush()
    return float(procs[name].stdout.readline())

  for name in procs:  # compile and warm up
    measure(name)
  times = {name: [] for name in procs}
  for _ in range(args.rounds):
    for name in procs:
      times[name].append(measure(name))
  for p in procs.values():
    p.stdin.close()
    p.wait()
  result = {
      "command": f"python benchmarks/reproducible_numerics.py --rounds {args.rounds} --steps {args.steps}",
      "seconds_per_step_median": {k: median(v) for k, v in times.items()},
      "seconds_per_step": times,
      "pinned_over_default": median(times["pinned"]) / median(times["default"]),
  }
  write_result("reproducible_numerics", result)


if __name__ == "__main__":
  main()
