"""Preference tuning on the bundled base: DPO and SimPO, from a short SFT adapter and from the base.

Every run is the fine-tuning command (``python -m jlora.finetune``) on the bundled data:

1. ``sft``: 200 steps of SFT on the word-reversal task (the starting adapter; an unfinished one,
   so that there is something left to learn);
2. ``dpo-from-sft``: DPO on the bundled pairs (chosen: the reversal; rejected: a plausible wrong
   order), starting from that adapter, the adapter itself frozen as the reference;
3. ``simpo-from-sft``: SimPO (reference-free; TRL's recipe beta 2.5, gamma 1.375) with CPO's NLL
   term on the chosen answers, from the same adapter;
4. ``dpo-from-base``: DPO from fresh adapters, the base (adapters off) as the reference.

It reports, on the 200 held-out pairs, the preference accuracy (``rewards/accuracies``: the
chosen answer's reward above the rejected one's) and the exact match of greedy answers, before
and after each run, and plots the held-out preference accuracy over the steps.

  python examples/preference_words.py --out runs/preference      # about 5 minutes on 2 CPU cores
  python examples/preference_words.py --smoke --out /tmp/pref     # a few steps each: does it run?

Results go to ``<out>/results.json`` and ``<out>/preference_accuracy.png`` (the README's
"Chat and preference tuning" section).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "jlora", "assets", "data")
PAIRS = (os.path.join(DATA, "reverse_words_pref.train.jsonl"), os.path.join(DATA, "reverse_words_pref.eval.jsonl"))

# (run, the command's options); {sft} is the SFT run's adapter.
RUNS = {
    "sft": ["--steps", "200"],
    "dpo-from-sft": ["--task", "dpo", "--data", PAIRS[0], "--eval-data", PAIRS[1], "--epochs", "2", "--lr", "1e-3",
                     "--beta", "0.5", "--init-adapter", "{sft}", "--reference", "init"],
    "simpo-from-sft": ["--task", "simpo", "--data", PAIRS[0], "--eval-data", PAIRS[1], "--epochs", "2", "--lr",
                       "1e-3", "--beta", "2.5", "--simpo-gamma", "1.375", "--cpo-alpha", "1.0", "--init-adapter",
                       "{sft}"],
    "dpo-from-base": ["--task", "dpo", "--data", PAIRS[0], "--eval-data", PAIRS[1], "--epochs", "3", "--lr", "4e-3"],
}
SMOKE = ["--steps", "2", "--batch-size", "4", "--rank", "2", "--eval-exact-match", "4", "--max-new-tokens", "4"]
# --smoke leaves out the run from the base (the DPO path of the run from the SFT adapter, without it).
SMOKE_RUNS = ("sft", "dpo-from-sft", "simpo-from-sft")


def _smoke_eval(out: str, name: str) -> str:
  """The first 16 held-out records of the run's data (--smoke: a short evaluation)."""
  src = PAIRS[1] if name != "sft" else os.path.join(DATA, "reverse_words.eval.jsonl")
  path = os.path.join(out, f"smoke_eval_{'pairs' if name != 'sft' else 'sft'}.jsonl")
  with open(src) as f, open(path, "w") as g:
    g.writelines(f.readlines()[:16])
  return path


def command(name: str, out: str, *, smoke: bool) -> list[str]:
  """The fine-tuning command of one run."""
  options = [o.format(sft=os.path.join(out, "sft", "adapter")) for o in RUNS[name]]
  if smoke:  # the run's own options, then tiny sizes (later flags win)
    options += SMOKE + ["--eval-data", _smoke_eval(out, name)]
  return [sys.executable, "-m", "jlora.finetune", *options, "--output-dir", os.path.join(out, name),
          "--overwrite", "--no-progress", "--eval-every", "2" if smoke else "25", "--log-every",
          "2" if smoke else "25"]


def _curve(out: str, name: str) -> list[tuple[int, float]]:
  with open(os.path.join(out, name, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [(r["step"], r["eval_rewards/accuracies"]) for r in rows if "eval_rewards/accuracies" in r]


def _plot(out: str, curves: dict[str, list[tuple[int, float]]], before: dict[str, float]) -> str:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for name, points in curves.items():
    xs, ys = zip(*([(0, before[name])] + points))
    ax.plot(xs, ys, "o-", label=name, markersize=3)
  ax.set_xlabel("step")
  ax.set_ylabel("held-out preference accuracy")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = os.path.join(out, "preference_accuracy.png")
  fig.savefig(path)
  plt.close(fig)
  return path


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=None, help="default: runs/preference (with --smoke: a new temporary directory)")
  ap.add_argument("--smoke", action="store_true", help="a few steps per run, small batches, 16 held-out records, "
                  "the run from the base left out: checks that it runs")
  args = ap.parse_args(argv)
  out = args.out or (tempfile.mkdtemp(prefix="preference-smoke-") if args.smoke else "runs/preference")
  results = {"smoke": args.smoke, "runs": {}}
  os.makedirs(out, exist_ok=True)
  for name in SMOKE_RUNS if args.smoke else RUNS:
    cmd = command(name, out, smoke=args.smoke)
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    with open(os.path.join(out, name, "summary.json")) as f:
      s = json.load(f)
    results["runs"][name] = {"command": " ".join(["python", *cmd[1:]]), "before": s["before"], "after": s["after"],
                             "steps": s["steps"], "seconds": round(s["seconds"], 1)}
  pref = [n for n in results["runs"] if n != "sft"]
  curves = {n: _curve(out, n) for n in pref}
  before = {n: results["runs"][n]["before"]["eval_rewards/accuracies"] for n in pref}
  results["plot"] = _plot(out, curves, before)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  print(f"\n{'run':>15} | {'pref. accuracy':>19} | {'exact match':>15} | steps | seconds")
  for name, r in results["runs"].items():
    acc = " -> ".join(f"{r[w]['eval_rewards/accuracies']:.3f}" if "eval_rewards/accuracies" in r[w] else "-"
                      for w in ("before", "after"))
    em = f"{r['before']['exact_match']:.3f} -> {r['after']['exact_match']:.3f}"
    print(f"{name:>15} | {acc:>19} | {em:>15} | {r['steps']:>5} | {r['seconds']:.0f}")
  print(f"wrote {os.path.join(out, 'results.json')} and {results['plot']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
