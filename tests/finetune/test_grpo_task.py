"""--task grpo end to end on the bundled base: TRL's metrics, a user's reward module called with the record's
fields, exports, options and their errors (the objective itself is checked against TRL 1.16 in tests/objectives)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import pytest

import jlora
from jlora.finetune import TrainConfig, UserError, run
from jlora.finetune.options import ASSETS, GROUPS
from jlora.finetune.rewards import rewards_for, score

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = f"{ASSETS}/data/reverse_words.train.jsonl"
SHORT = dict(task="grpo", steps=4, batch_size=8, num_generations=4, max_completion_length=8, rank=2, lr=1e-2,
             log_every=2, eval_every=2, save_every=100, eval_exact_match=4, progress=False, warmup_steps=0,
             reproducible=False)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
  """32 training and 8 held-out prompts of the bundled task, each with a field only a reward reads."""
  d = tmp_path_factory.mktemp("prompts")
  with open(TRAIN) as f:
    rows = [json.loads(line) for line in f.readlines()[:40]]
  for i, r in enumerate(rows):
    r["difficulty"] = i % 3
  (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
  (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[32:]))
  return str(d / "train.jsonl"), str(d / "eval.jsonl")


@pytest.fixture
def on_path(monkeypatch):
  monkeypatch.syspath_prepend(HERE)


def _run(out, prompts, **options):
  train, held = prompts
  return run(TrainConfig(output_dir=str(out), data=train, eval_data=held, **{**SHORT, **options}))


def _logged(out):
  return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_trains_logs_trls_metrics_calls_user_rewards_and_exports(prompts, tmp_path, on_path, monkeypatch):
  log = tmp_path / "calls.jsonl"
  monkeypatch.setenv("GRPO_REWARD_LOG", str(log))
  out = tmp_path / "run"
  summary = _run(out, prompts, reward=["grpo_rewards_example:word_overlap", "length:4:0.5"], beta=0.04,
                 num_iterations=2, epsilon_high=0.28, save_merged=True)
  logged = _logged(out)
  assert [e["step"] for e in logged] == [2, 4]
  names = ["reward", "reward_std", "frac_reward_zero_std", "rewards/word_overlap/mean", "rewards/length/mean",
           "completions/mean_length", "completions/clipped_ratio", "kl", "clip_ratio/region_mean",
           "clip_ratio/low_mean", "clip_ratio/high_mean", "rollout_tokens_per_s", "eval_reward",
           "eval_rewards/word_overlap/mean"]
  for e in logged:
    for name in names:
      assert np.isfinite(e[name]), (name, e)
  assert np.isfinite(logged[1]["train_tokens_per_s"])  # measured from the second rollout on
  # (not the loss: at the first step the ratio is 1 and group-relative advantages sum to 0, so the loss is
  # 0 up to rounding; the gradient is what the advantages weight)
  assert logged[0]["rollout_tokens_per_s"] > 0 and logged[0]["grad_norm"] > 0
  # The user's reward saw every field of the records (the completion and the extra one), once per completion.
  calls = [json.loads(line) for line in log.read_text().splitlines()]
  assert calls[0]["fields"] == ["completion", "difficulty"] and calls[0]["ids"] == calls[0]["n"]
  assert {c["n"] for c in calls} >= {8}  # a training rollout: 2 prompts x 4 completions
  # Exports: the adapter, PEFT and merged formats; the adapter trained.
  assert summary["task"] == "grpo" and (out / "peft" / "adapter_model.safetensors").exists()
  assert (out / "merged" / "model.safetensors").exists()
  lp = jlora.load_adapter(str(out / "adapter"), jlora.models.load(jlora.models.TINY_BASE)[1])
  assert any(np.abs(np.asarray(w.b)).max() > 0 for w in jlora._checkpoint.adapter_weights(lp).values())
  # eval_examples.jsonl: a few sampled completions of each evaluation, then the exact-match rows.
  rows = [json.loads(line) for line in (out / "eval_examples.jsonl").read_text().splitlines()]
  assert {r["step"] for r in rows if "rewards" in r} == {0, 2, 4}
  assert sum("match" in r for r in rows) == 4 and "exact_match" in summary["after"]


def test_dynamic_sampling_drops_groups_without_signal(prompts, tmp_path):
  summary = _run(tmp_path / "dyn", prompts, dynamic_sampling=True, steps=2, log_every=1, eval_every=100,
                 eval_exact_match=-1)
  logged = _logged(tmp_path / "dyn")
  # The base never reverses the words: every group's rewards are all 0, all dropped, nothing trained.
  assert [e["dropped_groups"] for e in logged] == [2.0, 2.0]
  assert all(e["loss"] == 0.0 and e["grad_norm"] == 0.0 and e["frac_reward_zero_std"] == 1.0 for e in logged)
  assert summary["after"]["eval_reward"] == 0.0


@pytest.mark.parametrize("reward,match", [
    ("returns_none", r"--reward grpo_rewards_example:returns_none returned None for completion 0; every value "
                     r"must be a number"),
    ("returns_nan", r"returned nan for completion 0; every value must be finite"),
    ("wrong_count", r"returned 1 values for 8 completions; it must return one number per completion"),
    ("raises", r"--reward grpo_rewards_example:raises raised KeyError: 'answer_key'"),
    ("missing", r"--reward grpo_rewards_example:missing: grpo_rewards_example has no function 'missing'"),
])
def test_bad_rewards_are_errors_naming_them(on_path, reward, match):
  """What the command calls on each rollout (loaded once, then checked on every call)."""
  with pytest.raises(UserError, match=match):
    rs = rewards_for([f"grpo_rewards_example:{reward}"], max_completion_length=8)
    score(rs, ["Q"] * 8, ["a b"] * 8, [[1, 2]] * 8, {"completion": ["a b"] * 8})


def test_a_bad_reward_stops_the_command_before_training(prompts, tmp_path, on_path):
  with pytest.raises(UserError, match=r"--reward grpo_rewards_example:raises raised KeyError: 'answer_key'"):
    _run(tmp_path / "run", prompts, reward=["grpo_rewards_example:raises"], steps=1, eval_exact_match=-1)
  assert not (tmp_path / "run").exists()  # refused before training: nothing left behind


def test_options_and_their_errors(prompts, tmp_path):
  assert TrainConfig(task="grpo").resolved().beta == 0.0 and TrainConfig(task="dpo").resolved().beta == 0.1
  assert TrainConfig(task="grpo").resolved().loss_type == "dapo"
  assert TrainConfig(task="dpo").resolved().loss_type == "sigmoid"
  assert TrainConfig(task="grpo", reward="exact_match,length:8:0.5").reward == ("exact_match", "length:8:0.5")
  with pytest.raises(ValueError, match="loss_type must be one of grpo, bnpo, dr_grpo, dapo with --task grpo; got "
                                       "'sigmoid'"):
    TrainConfig(task="grpo", loss_type="sigmoid")
  with pytest.raises(ValueError, match="loss_type must be one of sigmoid, ipo, hinge, robust with --task dpo"):
    TrainConfig(task="dpo", loss_type="dapo")
  with pytest.raises(ValueError, match="beta must be > 0"):
    TrainConfig(task="dpo", beta=0.0)
  with pytest.raises(ValueError, match="num_generations must be >= 2"):
    TrainConfig(task="grpo", num_generations=1)
  with pytest.raises(ValueError, match=r"num_generations must divide the completions of a step, batch_size \* "
                                       r"grad_accum = 16 \* 1; got 3"):
    TrainConfig(task="grpo", num_generations=3)
  with pytest.raises(ValueError, match="scale_rewards must be one of group, batch, none"):
    TrainConfig(task="grpo", scale_rewards="std")
  with pytest.raises(ValueError, match="importance_sampling_level must be one of token, sequence"):
    TrainConfig(task="grpo", importance_sampling_level="seq")
  with pytest.raises(ValueError, match=r"reward 'bogus': use exact_match, contains, regex:PATTERN, length:BUDGET"):
    TrainConfig(task="grpo", reward=["bogus"])
  with pytest.raises(ValueError, match=r"reward 'regex:\(': '\(' is not a valid regex"):
    TrainConfig(task="grpo", reward=["regex:("])
  with pytest.raises(ValueError, match=r"reward 'length': write length:BUDGET"):
    TrainConfig(task="grpo", reward=["length"])
  with pytest.raises(ValueError, match="top_p must be in"):
    TrainConfig(task="grpo", top_p=0.0)
  with pytest.raises(ValueError, match="epsilon_high must be > 0"):
    TrainConfig(task="grpo", epsilon_high=0.0)
  with pytest.raises(ValueError, match="reward must name at least one reward function"):
    TrainConfig(task="grpo", reward=[])
  with pytest.raises(UserError, match=r"--reward length:8: the budget must be below --max-completion-length \(8\)"):
    _run(tmp_path / "len", prompts, reward=["length:8"])
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"question": "Q"}) + "\n")
  with pytest.raises(jlora.data.DataError, match=r"bad.jsonl:1: no prompt \(have \['question'\]\)"):
    _run(tmp_path / "bad", (str(bad), prompts[1]))
  noanswer = tmp_path / "noanswer.jsonl"
  noanswer.write_text(json.dumps({"prompt": "Q"}) + "\n")
  with pytest.raises(jlora.data.DataError, match=r"noanswer.jsonl:1: --reward exact_match compares the completion "
                                                 r"with the record's answer or completion field"):
    _run(tmp_path / "noanswer", (str(noanswer), prompts[1]))
  assert not any((tmp_path / d).exists() for d in ("len", "bad", "noanswer"))


def test_every_option_is_in_one_group_and_classified_for_resume():
  from jlora.finetune.config import RESUME_MAY_DIFFER

  fields = [f.name for f in dataclasses.fields(TrainConfig)]
  owners = {name: [g.__name__ for g in GROUPS if name in {f.name for f in dataclasses.fields(g)}] for name in fields}
  assert {name: o for name, o in owners.items() if len(o) != 1} == {}
  rl = ["num_generations", "reward", "scale_rewards", "num_iterations", "epsilon", "epsilon_high",
        "importance_sampling_level", "dynamic_sampling", "max_completion_length", "temperature", "top_p", "top_k",
        "stop"]
  assert all(owners[n] == ["ObjectiveOptions"] for n in rl)
  assert not set(rl) & RESUME_MAY_DIFFER  # each changes what is trained on


def test_messages_records_and_show_example(tmp_path, capsys):
  chats = tmp_path / "chats.jsonl"
  with open(f"{ASSETS}/data/word_chats.train.jsonl") as f:
    chats.write_text("".join(f.readlines()[:2]))
  run(TrainConfig(task="grpo", data=str(chats), show_example=0))
  shown = capsys.readouterr().out
  # The conversation up to its last answer is the prompt; that answer is the completion field the rewards read.
  assert "Now sort them." in shown and '"completion": "case object part"' in shown
  assert sys.modules["jlora.finetune.tasks.grpo"].parse_prompt is not None
