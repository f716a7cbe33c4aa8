"""What `--reproducible` (pinned XLA:CPU numerics) costs: the bundled run's train step, pinned vs not.

XLA flags are per process, so two worker processes each compile a train step of
the default command's shape (bundled tiny model on ``jlora.models``, batch 16 x 48
tokens, LoRA r=8 on all linear layers, AdamW with clipping; random token ids) once,
one with ``jlora.finetune.numerics.pin()`` and one without;
the parent then asks them in turn to run ``--steps`` steps, so that machine noise
hits both alike, and reports the median time per step and the ratio.

  python benchmarks/reproducible_numerics.py --rounds 7 --steps 20   # the defaults
  python benchmarks/reproducible_numerics.py --smoke   # one round of one step (what the suite runs)
"""

from __future__ import annotations

import argparse
import functools
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
  import jax.numpy as jnp
  import numpy as np
  import optax

  import jlora
  import jlora.models
  from jlora.finetune import TrainConfig

  from jlora.finetune.options import DEFAULT_MODEL

  cfg = TrainConfig()  # the default command's sizes: bundled model, batch, sequence length, rank, targets
  model, params = jlora.models.load(cfg.model or DEFAULT_MODEL)
  lora_cfg = jlora.LoraConfig(rank=cfg.rank, alpha=cfg.alpha, targets=model.targets(cfg.targets))
  adapters, frozen = jlora.split(jlora.init(jax.random.key(0), params, lora_cfg, layout=model.layout))
  inner = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adamw(cfg.lr, weight_decay=cfg.weight_decay))
  tx = jlora.optimizer(inner, adapters)
  opt_state = tx.init(adapters)
  forward = jlora.wrap(model)

  def loss_fn(adapters, ids, mask):
    logits = forward(jlora.combine(adapters, frozen), ids, attention_mask=mask)[:, :-1].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
    return jnp.sum(ce * mask[:, 1:]) / jnp.maximum(jnp.sum(mask[:, 1:]), 1)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step_fn(adapters, opt_state, ids, mask):
    loss, g = jax.value_and_grad(loss_fn)(adapters, ids, mask)
    updates, opt_state = tx.update(g, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  # Token values do not change the cost of a step: random ids of the command's batch shape.
  rng = np.random.default_rng(0)
  vocab = model.config.vocab_size
  batches = [(jnp.asarray(rng.integers(1, vocab, (cfg.batch_size, cfg.max_seq_len)), jnp.int32),
              jnp.ones((cfg.batch_size, cfg.max_seq_len), jnp.int32)) for _ in range(8)]
  step = 0
  for line in sys.stdin:
    n = int(line)
    t0 = time.perf_counter()
    for _ in range(n):
      adapters, opt_state, loss = step_fn(adapters, opt_state, *batches[step % len(batches)])
      step += 1
    loss.block_until_ready()
    print((time.perf_counter() - t0) / n, flush=True)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--steps", type=int, default=20, help="steps per measurement")
  ap.add_argument("--worker", choices=["pinned", "default"], help=argparse.SUPPRESS)
  from _common import add_smoke_flag, median, write_result

  add_smoke_flag(ap)
  args = ap.parse_args()
  if args.worker:
    worker(args.worker == "pinned")
    return
  if args.smoke:
    args.rounds, args.steps = 1, 1
  # The workers' XLA flags: none but the pin (a smoke run keeps the caller's fast-compile flags).
  env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") if args.smoke else ""}
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
  write_result("reproducible_numerics", result, args=args)


if __name__ == "__main__":
  main()
