"""GRPO on the bundled base: the exact-match reward on word reversal, from a short SFT adapter and from the base.

Every run is the fine-tuning command (``python -m jlora.finetune``) on the bundled data:

1. ``sft``: 300 steps of SFT on the word-reversal task (the starting adapter: an unfinished
   one, which answers about half of the prompts right, so that most groups hold both right and
   wrong answers to compare; after 200 steps it answers about 1 in 9 greedily and fewer
   sampled, and the runs tried from there lowered the reward);
2. ``grpo-from-sft``: ``--task grpo --reward exact_match`` (1 if the sampled completion, stripped,
   equals the record's ``completion``), starting from that adapter; each step samples
   ``--num-generations`` completions of each of its prompts from the adapters being trained;
3. ``grpo-from-base``: the same from fresh adapters (the base cannot do the task: its rewards
   are all 0, so every advantage is 0 and nothing moves, which this run shows).

It reports the mean reward of each step's sampled completions (TRL's ``reward``, the curve
plotted), and on the 200 held-out prompts the reward and the exact match of greedy answers,
before and after each run, and the time of each run.

  python examples/grpo_words.py --out runs/grpo      # 5 to 10 minutes on 2 CPU cores
  python examples/grpo_words.py --smoke --out /tmp/grpo     # a few steps each, 8 held-out prompts: does it run?

Results go to ``<out>/results.json`` and ``<out>/grpo_reward.png`` (the README's
"Reinforcement learning (GRPO family)" section).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "jlora", "assets", "data")
SFT_STEPS = "300"
# GRPO's options, the same for both runs: 16 prompts a step, 8 completions each.
GRPO = ["--task", "grpo", "--reward", "exact_match", "--num-generations", "8", "--batch-size", "128", "--lr", "3e-4",
        "--warmup-steps", "3", "--steps", "200", "--max-completion-length", "10"]
# (run, the command's options); {sft} is the SFT run's adapter.
RUNS = {
    "sft": ["--steps", SFT_STEPS],
    "grpo-from-sft": [*GRPO, "--init-adapter", "{sft}"],
    "grpo-from-base": GRPO,
}
SMOKE = ["--steps", "2", "--batch-size", "4", "--rank", "2", "--eval-exact-match", "4", "--max-new-tokens", "4"]
SMOKE_GRPO = ["--num-generations", "2", "--max-completion-length", "4", "--warmup-steps", "1"]
SMOKE_EVAL = 8  # --smoke: the first held-out prompts only


def _smoke_eval(out: str) -> str:
  """The first SMOKE_EVAL held-out prompts, in a file of ``out``."""
  path = os.path.join(out, "eval_smoke.jsonl")
  if not os.path.exists(path):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(DATA, "reverse_words.eval.jsonl")) as f:
      lines = f.readlines()[:SMOKE_EVAL]
    with open(path, "w") as f:
      f.writelines(lines)
  return path


def command(name: str, out: str, *, smoke: bool) -> list[str]:
  """The fine-tuning command of one run."""
  options = [o.format(sft=os.path.join(out, "sft", "adapter")) for o in RUNS[name]]
  if smoke:  # the run's own options, then tiny sizes (later flags win)
    options += SMOKE + (SMOKE_GRPO if name != "sft" else []) + ["--eval-data", _smoke_eval(out)]
  # (evaluations run at logged steps: --eval-every a multiple of --log-every)
  every = "2" if smoke else ("100" if name == "sft" else "20")
  log = "2" if smoke else ("100" if name == "sft" else "4")
  return [sys.executable, "-m", "jlora.finetune", *options, "--output-dir", os.path.join(out, name),
          "--overwrite", "--no-progress", "--eval-every", every, "--log-every", log]


def _curves(out: str, name: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
  """(step, mean reward of the step's sampled completions), (step, held-out reward of greedy answers)."""
  with open(os.path.join(out, name, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return ([(r["step"], r["reward"]) for r in rows if "reward" in r],
          [(r["step"], r["eval_reward"]) for r in rows if "eval_reward" in r])


def _plot(out: str, curves: dict, before: dict[str, float]) -> str:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for (name, (train, held_out)), colour in zip(curves.items(), ("C0", "C1")):
    xs, ys = zip(*train)
    ax.plot(xs, ys, "-", color=colour, alpha=0.8, label=f"{name}: sampled completions")
    xs, ys = zip(*([(0, before[name])] + held_out))
    ax.plot(xs, ys, "o--", color=colour, markersize=4, label=f"{name}: held-out, greedy")
  ax.set_xlabel("step")
  ax.set_ylabel("mean reward (exact match)")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(out, "grpo_reward.png")
  fig.savefig(path)
  plt.close(fig)
  return path


def _mean(points: list[tuple[int, float]]) -> float:
  return sum(v for _, v in points) / len(points)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=None, help="default: runs/grpo (with --smoke: a new temporary directory)")
  ap.add_argument("--smoke", action="store_true", help="a few steps per run, small batches: checks that it runs")
  args = ap.parse_args(argv)
  out = args.out or (tempfile.mkdtemp(prefix="grpo-smoke-") if args.smoke else "runs/grpo")
  results = {"smoke": args.smoke, "runs": {}}
  started = time.perf_counter()
  for name in RUNS:
    cmd = command(name, out, smoke=args.smoke)
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    with open(os.path.join(out, name, "summary.json")) as f:
      s = json.load(f)
    results["runs"][name] = {"command": " ".join(["python", *cmd[1:]]), "before": s["before"], "after": s["after"],
                             "steps": s["steps"], "seconds": round(s["seconds"], 1),
                             "wall_seconds": round(time.perf_counter() - t0, 1)}
  results["wall_seconds"] = round(time.perf_counter() - started, 1)
  grpo = [n for n in RUNS if n != "sft"]
  curves = {n: _curves(out, n) for n in grpo}
  for n in grpo:  # the sampled completions' mean reward: the first and the last quarter of the logged steps
    train = curves[n][0]
    k = max(1, len(train) // 4)
    results["runs"][n]["reward_curve"] = train
    results["runs"][n]["reward_first_quarter"] = _mean(train[:k])
    results["runs"][n]["reward_last_quarter"] = _mean(train[-k:])
  before = {n: results["runs"][n]["before"]["eval_reward"] for n in grpo}
  results["plot"] = _plot(out, curves, before)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  print(f"\n{'run':>15} | {'sampled reward':>15} | {'held-out reward':>15} | {'exact match':>15} | steps | seconds")
  for name, r in results["runs"].items():
    sampled = (f"{r['reward_first_quarter']:.3f} -> {r['reward_last_quarter']:.3f}" if "reward_curve" in r else "-")
    reward = (" -> ".join(f"{r[w]['eval_reward']:.3f}" for w in ("before", "after")) if "eval_reward" in r["after"]
              else "-")
    em = f"{r['before']['exact_match']:.3f} -> {r['after']['exact_match']:.3f}"
    print(f"{name:>15} | {sampled:>15} | {reward:>15} | {em:>15} | {r['steps']:>5} | {r['wall_seconds']:.0f}")
  print(f"all runs: {results['wall_seconds']:.0f} s")
  print(f"wrote {os.path.join(out, 'results.json')} and {results['plot']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
