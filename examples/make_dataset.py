"""Builds the bundled datasets: reverse the order of three words, as instructions, preferences and chats.

The base model (pretrained on the Python docs) has never seen this
instruction; exact-match accuracy on held-out word triples measures whether a
LoRA run taught it. Reproducible from the seed; no network. Three files per split:

* ``reverse_words.{train,eval}.jsonl``: prompt/completion (the default task of jlora-finetune);
* ``reverse_words_pref.{train,eval}.jsonl``: prompt/chosen/rejected (--task dpo, simpo, orpo, kto):
  chosen is the reversal, rejected a plausible wrong order (the words as given, or another
  permutation);
* ``word_chats.{train,eval}.jsonl``: OpenAI ``messages``, a system turn then two rounds (reverse
  the words, then sort them), trained on both assistant turns through the bundled chat template.

The held-out word triples are the same in all three.

  python examples/make_dataset.py        # writes jlora/assets/data/*.jsonl
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


def preference(words: tuple[str, ...], rng: random.Random) -> dict:
  ex = example(words)
  wrong = [tuple(words), (words[1], words[0], words[2]), (words[0], words[2], words[1]), (words[1], words[2], words[0])]
  return {"prompt": ex["prompt"], "chosen": ex["completion"], "rejected": " " + " ".join(rng.choice(wrong))}


def chat(words: tuple[str, ...]) -> dict:
  return {"messages": [
      {"role": "system", "content": "You rearrange words."},
      {"role": "user", "content": f"Reverse the words: {' '.join(words)}"},
      {"role": "assistant", "content": " ".join(reversed(words))},
      {"role": "user", "content": "Now sort them."},
      {"role": "assistant", "content": " ".join(sorted(words))},
  ]}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=DEFAULT_OUT)
  ap.add_argument("--train", type=int, default=3000)
  ap.add_argument("--eval", type=int, default=200)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--pairs", type=int, default=1000, help="preference pairs per split (at most --train/--eval)")
  ap.add_argument("--chats", type=int, default=1000, help="conversations per split (at most --train/--eval)")
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
  pref_rng = random.Random(args.seed + 1)
  for name, part in (("train", triples[:args.train]), ("eval", triples[args.train:])):
    for stem, make, n in (("reverse_words", example, len(part)),
                          ("reverse_words_pref", lambda t: preference(t, pref_rng), min(len(part), args.pairs)),
                          ("word_chats", chat, min(len(part), args.chats))):
      path = os.path.join(args.out, f"{stem}.{name}.jsonl")
      with open(path, "w") as f:
        for t in part[:n]:
          f.write(json.dumps(make(t)) + "\n")
      print(f"wrote {n} examples to {os.path.abspath(path)}")


if __name__ == "__main__":
  main()
