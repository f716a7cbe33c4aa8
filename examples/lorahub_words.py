"""LoRAHub end to end on the bundled base: adapters for word tasks, composed for an unseen one.

1. Writes four word tasks over triples of the bundled vocabulary (reverse, sort, upper-case,
   drop the first word) and trains one LoRA adapter per task with ``python -m jlora.finetune``
   on the bundled base model (skipped when ``<out>/<task>/adapter`` exists).
2. For each unseen, related task ("reverse the words in capitals": two seen operations at
   once; "put the words in the opposite order": a seen operation asked in new words) takes
   ``--shots`` examples and runs ``jlora.lorahub`` to find the weights of the four adapters
   that minimise the few-shot loss + 0.05·mean|w|: the paper's setting (gradient-free, 40
   evaluations from w = 0, here the seeded (1+1)-ES) and the gradient option (40 Adam steps
   on w).
3. Compares, on 200 held-out examples of each unseen task, the base model, the uniform average
   of the adapters, each adapter alone and the LoRAHub composition: completion loss,
   next-token accuracy on the completion (teacher forced) and exact match of greedy
   generations.

  python examples/lorahub_words.py --out runs/lorahub      # ~5 minutes on 2 CPU cores
  python examples/lorahub_words.py --smoke --out /tmp/hub  # 2-step adapters, 4 shots, budget 2: does it run?

Results go to ``<out>/results.json`` (numbers in the README's "Many adapters" section).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

TASKS = {
    "reverse": ("Reverse the words: {}", lambda w: list(reversed(w))),
    "sort": ("Sort the words: {}", sorted),
    "upper": ("Uppercase the words: {}", lambda w: [x.upper() for x in w]),
    "drop_first": ("Drop the first word: {}", lambda w: list(w[1:])),
}
# Unseen tasks: a composition of two seen operations, and a seen operation asked in new words.
UNSEEN = {
    "reverse_in_capitals": ("Reverse the words in capitals: {}", lambda w: [x.upper() for x in reversed(w)]),
    "opposite_order": ("Put the words in the opposite order: {}", lambda w: list(reversed(w))),
}


def _words() -> list[str]:
  spec = importlib.util.spec_from_file_location("make_dataset", os.path.join(HERE, "make_dataset.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return sorted(set(mod.WORDS))


def write_task(path_prefix: str, template: str, fn, *, n_train: int, n_eval: int, seed: int) -> tuple[str, str]:
  vocab = _words()
  rng = random.Random(seed)
  seen, triples = set(), []
  while len(triples) < n_train + n_eval:
    t = tuple(rng.sample(vocab, 3))
    if t not in seen:
      seen.add(t)
      triples.append(t)
  paths = []
  for name, part in (("train", triples[:n_train]), ("eval", triples[n_train:])):
    path = f"{path_prefix}.{name}.jsonl"
    with open(path, "w") as f:
      for t in part:
        f.write(json.dumps({"prompt": template.format(" ".join(t)) + "\nAnswer:",
                            "completion": " " + " ".join(fn(list(t)))}) + "\n")
    paths.append(path)
  return paths[0], paths[1]


# --smoke: each task's fine-tuning run on small batches and a rank-2 adapter, few examples everywhere.
SMOKE_FINETUNE = ("--batch-size", "2", "--rank", "2")
SMOKE = dict(steps=2, shots=4, budget=2, eval=4, n_train=32, n_eval=4, max_new_tokens=4, unseen=1)


def train_command(data: str, eval_data: str, output_dir: str, steps: int, extra=()) -> list[str]:
  """The fine-tuning command that trains one task's adapter."""
  return [sys.executable, "-m", "jlora.finetune", "--data", data, "--eval-data", eval_data, "--output-dir",
          output_dir, "--steps", str(steps), "--eval-exact-match", "-1", "--eval-every", "100000", "--no-progress",
          *extra]


def train(task: str, data: str, eval_data: str, out: str, steps: int, extra=()) -> str:
  adapter = os.path.join(out, task, "adapter")
  if os.path.isdir(adapter):
    print(f"[{task}] adapter exists: {adapter}")
    return adapter
  cmd = train_command(data, eval_data, os.path.join(out, task), steps, extra)
  print("$", " ".join(cmd), flush=True)
  t0 = time.time()
  subprocess.run(cmd, check=True)
  print(f"[{task}] trained in {time.time() - t0:.0f}s", flush=True)
  return adapter


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=None, help="default: runs/lorahub (with --smoke: a new temporary directory, "
                                              "so that a smoke run never mixes with a real run's adapters and results)")
  ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps per task adapter (default: 400)")
  ap.add_argument("--shots", type=int, default=None,
                  help="examples of the unseen task LoRAHub sees (5-20; default: 16)")
  ap.add_argument("--budget", type=int, default=None, help="LoRAHub evaluations (or Adam steps; default: 40)")
  ap.add_argument("--eval", type=int, default=None, help="held-out examples of the unseen task (default: 200)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--smoke", action="store_true",
                  help="checks quickly that the example runs: 2-step adapters (batch 2, rank 2) on 32 examples per "
                       "task, then LoRAHub with budget 2 on 4 shots of the first unseen task, scored on 4 examples")
  args = ap.parse_args(argv)
  if args.out is None:
    args.out = tempfile.mkdtemp(prefix="lorahub-smoke-") if args.smoke else "runs/lorahub"
  sizes = SMOKE if args.smoke else dict(steps=400, shots=16, budget=40, eval=200, n_train=3000, n_eval=200,
                                        max_new_tokens=16, unseen=len(UNSEEN))
  for k in ("steps", "shots", "budget", "eval"):
    if getattr(args, k) is None:
      setattr(args, k, sizes[k])
  os.makedirs(os.path.join(args.out, "data"), exist_ok=True)
  adapters_dirs = {}
  for i, (task, (template, fn)) in enumerate(TASKS.items()):
    tr, ev = write_task(os.path.join(args.out, "data", task), template, fn, n_train=sizes["n_train"],
                        n_eval=sizes["n_eval"], seed=i)
    adapters_dirs[task] = train(task, tr, ev, args.out, args.steps, SMOKE_FINETUNE if args.smoke else ())

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import jlora
  import jlora.data
  from jlora.finetune import model as model_lib
  from jlora.finetune.tasks.sft import exact_match
  from jlora.finetune.config import DEFAULT_MODEL

  loaded = model_lib.load(DEFAULT_MODEL)
  adapters = [jlora.load_adapter(d, loaded.params) for d in adapters_dirs.values()]
  n = len(adapters)

  @jax.jit
  def token_stats(tree, ids, attention_mask, loss_mask):
    """Completion cross-entropy and next-token accuracy (teacher forced)."""
    logits = jlora.wrap(loaded.forward)(tree, ids, attention_mask)[:, :-1].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
    hit = (jnp.argmax(logits, -1) == ids[:, 1:]).astype(jnp.float32)
    mask = loss_mask[:, 1:]
    return jnp.sum(ce * mask) / jnp.sum(mask), jnp.sum(hit * mask) / jnp.sum(mask)

  result = {"shots": args.shots, "budget": args.budget, "seed": args.seed, "steps_per_adapter": args.steps,
            **({"smoke": True} if args.smoke else {}), "tasks": {}}
  for k, (name, (template, fn)) in enumerate(list(UNSEEN.items())[:sizes["unseen"]]):
    tr, ev = write_task(os.path.join(args.out, "data", name), template, fn, n_train=args.shots, n_eval=args.eval,
                        seed=100 + k)
    shots, _ = jlora.data.read_sft(tr)
    held, _ = jlora.data.read_sft(ev)
    few, _ = jlora.data.tokenize_sft(shots, loaded.tokenizer, max_len=48)
    held_tok, _ = jlora.data.tokenize_sft(held, loaded.tokenizer, max_len=48)

    def loss_fn(tree, few=few):  # mean cross-entropy of the completion tokens of the few-shot examples
      return token_stats(tree, few.ids, few.attention_mask, few.loss_mask)[0]

    hubs = {}
    for label, optimizer in (("LoRAHub (1+1)-ES", "es"), ("LoRAHub adam", optax.adam(0.2))):
      t0 = time.time()
      hub = jlora.lorahub(loss_fn, adapters, budget=args.budget, optimizer=optimizer, seed=args.seed)
      hubs[label] = (hub, time.time() - t0)
      print(f"[{name}] {label}: weights {np.round(hub.weights, 3).tolist()}, few-shot loss {hub.loss:.4f}, "
            f"{hubs[label][1]:.0f}s", flush=True)
    candidates = {
        "base": jlora.compose(adapters, [0.0] * n, method="cat"),  # zero weights: the base model
        "uniform average": jlora.compose(adapters, [1.0 / n] * n, method="cat"),
        **{f"{t} adapter": a for t, a in zip(TASKS, adapters)},
        **{label: hub.params for label, (hub, _) in hubs.items()},
    }
    rows = {}
    for label, tree in candidates.items():
      loss, acc = (float(v) for v in token_stats(tree, held_tok.ids, held_tok.attention_mask, held_tok.loss_mask))
      em, _ = exact_match(loaded, tree, held, chat_template=None, max_new_tokens=sizes["max_new_tokens"])
      rows[label] = {"few_shot_loss": round(float(loss_fn(tree)), 4), "heldout_loss": round(loss, 4),
                     "token_accuracy": round(acc, 4), "exact_match": round(em, 4)}
      print(f"[{name}] {label:>18}: few-shot loss {rows[label]['few_shot_loss']:.4f} | held-out loss {loss:.4f} | "
            f"token accuracy {acc:.3f} | exact match {em:.3f}", flush=True)
    result["tasks"][name] = {
        "prompt": template, "results": rows,
        "lorahub": {label: {"weights": dict(zip(TASKS, np.round(hub.weights, 4).tolist())),
                            "objective": round(hub.objective, 4), "seconds": round(sec, 1)}
                    for label, (hub, sec) in hubs.items()}}
  result["jax"] = jax.__version__
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
