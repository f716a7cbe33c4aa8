"""A user's reward module for the GRPO tests (``--reward grpo_rewards_example:word_overlap``)."""

import json
import os


def word_overlap(prompts, completions, completion_ids, completion, difficulty, **fields):
  """Share of the reference's words at their place in the completion (partial credit: a signal from the start)."""
  log = os.environ.get("GRPO_REWARD_LOG")
  if log:
    with open(log, "a") as f:
      f.write(json.dumps({"n": len(completions), "fields": sorted(["completion", "difficulty", *fields]),
                          "difficulty": difficulty[0], "ids": len(completion_ids)}) + "\n")
  out = []
  for c, want in zip(completions, completion):
    got, ref = c.split(), want.split()
    out.append(sum(a == b for a, b in zip(got, ref)) / len(ref))
  return out


def returns_none(prompts, completions, **fields):
  return [None] * len(completions)


def returns_nan(prompts, completions, **fields):
  return [float("nan")] * len(completions)


def wrong_count(prompts, completions, **fields):
  return [0.0]


def raises(prompts, completions, **fields):
  raise KeyError("answer_key")
