"""Builds the bundled instruction dataset: reverse the order of three words.

The base model (pretrained on the Python docs) has never seen this
instruction; exact-match accuracy on held-out word triples measures whether a
LoRA run taught it. Reproducible from the seed; no network.

  python examples/make_dataset.py        # writes jlora/assets/data/reverse_words.{train,eval}.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random

# Common words of the Python documentation (the base model's pretraining text).
WORDS = """list class value object module function string number type name file data code
method return error index item key loop call line table set map test case file path time
line order size text byte char form mode node list part rule sort task view word""".split()

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "jlora", "assets", "data")


def example(words: tuple[str, ...]) -> dict:
  return {"prompt": f"Reverse the words: {' '.join(words)}\nAnswer:",
          "completion": " " + " ".join(reversed(words))}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=DEFAULT_OUT)
  ap.add_argument("--train", type=int, default=3000)
  ap.add_argument("--eval", type=int, default=200)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  vocab = sorted(set(WORDS))
  rng = random.Random(args.seed)
  seen: set[tuple[str, ...]] = set()
  triples = []
  while len(triples) < args.train + args.eval:
    t = tuple(rng.sample(vocab, 3))
    if t not in seen:
      seen.add(t)
      triples.append(t)
  os.makedirs(args.out, exist_ok=True)
  for name, part in (("train", triples[:args.train]), ("eval", triples[args.train:])):
    path = os.path.join(args.out, f"reverse_words.{name}.jsonl")
    with open(path, "w") as f:
      for t in part:
        f.write(json.dumps(example(t)) + "\n")
    print(f"wrote {len(part)} examples to {os.path.abspath(path)}")


if __name__ == "__main__":
  main()
