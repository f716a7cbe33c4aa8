"""--task dpo, simpo, orpo, kto end to end on the bundled preference pairs (the losses themselves are
checked against TRL 1.16 in tests/objectives, the tokenization in tests/data)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jlora
from jlora.finetune import TrainConfig, UserError, run
from jlora.finetune.options import ASSETS

PAIRS = f"{ASSETS}/data/reverse_words_pref.train.jsonl"
SHORT = dict(steps=4, batch_size=4, max_seq_len=32, rank=2, lr=1e-3, log_every=2, eval_every=2,
             eval_exact_match=-1, progress=False, warmup_steps=0)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
  d = tmp_path_factory.mktemp("pairs")
  with open(PAIRS) as f:
    lines = f.readlines()
  (d / "train.jsonl").write_text("".join(lines[:64]))
  (d / "eval.jsonl").write_text("".join(lines[64:72]))
  return str(d / "train.jsonl"), str(d / "eval.jsonl")


def _run(out, pairs, **options):
  train, held = pairs
  return run(TrainConfig(output_dir=str(out), data=train, eval_data=held, **{**SHORT, **options}))


def _logged(out):
  return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


DPO_NAMES = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected"]


@pytest.mark.parametrize("task,names", [
    # slow: DPO's command runs twice more below (metrics, exports and the reference checked there)
    pytest.param("dpo", DPO_NAMES, marks=pytest.mark.slow),
    ("simpo", ["rewards/accuracies", "rewards/margins", "logps/chosen", "nll_loss"]),
    # slow: ORPO takes SimPO's reference-free path through the task; its loss and metrics are TRL's in
    # tests/objectives/test_trl_parity.py
    pytest.param("orpo", ["rewards/accuracies", "log_odds_ratio", "log_odds_chosen", "nll_loss"],
                 marks=pytest.mark.slow),
    ("kto", ["kl", "rewards/chosen", "rewards/rejected", "logps/chosen"]),
])
def test_each_objective_trains_logs_trls_metrics_and_exports(task, names, pairs, tmp_path):
  out = tmp_path / task
  summary = _run(out, pairs, task=task)
  logged = _logged(out)
  assert [e["step"] for e in logged] == [2, 4]
  for e in logged:
    for name in names:
      assert np.isfinite(e[name]), (name, e)
      assert np.isfinite(e[f"eval_{name}"]) or task == "kto", (name, e)  # KTO: NaN for a label a batch lacks
  assert all(np.isfinite(summary["after"][k]) for k in ("eval_loss",))
  assert summary["task"] == task and (out / "peft" / "adapter_model.safetensors").exists()
  lp = jlora.load_adapter(str(out / "adapter"), jlora.models.load(jlora.models.TINY_BASE)[1])
  assert any(np.abs(np.asarray(w.b)).max() > 0 for w in jlora._checkpoint.adapter_weights(lp).values())


def test_dpo_against_the_base_starts_at_zero_reward_and_a_precomputed_reference_is_the_same(pairs, tmp_path):
  live = _run(tmp_path / "live", pairs, task="dpo")
  # Before training the policy is the base (B = 0): every reward is exactly 0, the loss log(2).
  before = live["before"]
  assert before["eval_rewards/chosen"] == 0.0 and before["eval_rewards/rejected"] == 0.0
  assert before["eval_rewards/margins"] == 0.0 and before["eval_loss"] == pytest.approx(np.log(2), abs=1e-7)
  logged = _logged(tmp_path / "live")
  assert [e["step"] for e in logged] == [2, 4]
  assert all(np.isfinite(e[k]) and np.isfinite(e[f"eval_{k}"]) for e in logged for k in DPO_NAMES)
  assert live["task"] == "dpo" and (tmp_path / "live" / "peft" / "adapter_model.safetensors").exists()
  _run(tmp_path / "pre", pairs, task="dpo", precompute_reference=True)
  a, b = logged, _logged(tmp_path / "pre")
  assert [e["step"] for e in b] == [2, 4]
  for x, y in zip(a, b):  # the same numbers, computed before training instead of in the step
    for k in ("loss", "rewards/margins", "eval_loss", "eval_rewards/margins"):
      assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k


def test_from_an_sft_adapter_with_itself_as_the_reference(pairs, tmp_path):
  sft = tmp_path / "sft"
  run(TrainConfig(output_dir=str(sft), steps=4, batch_size=8, max_seq_len=32, rank=2, eval_exact_match=-1,
                  progress=False))
  for ref in ("init", "base"):
    summary = _run(tmp_path / f"dpo-{ref}", pairs, task="dpo", init_adapter=str(sft / "peft"), reference=ref)
    rewards = summary["before"]["eval_rewards/margins"]
    if ref == "init":  # the policy starts as the reference: rewards exactly 0
      assert rewards == 0.0 and summary["before"]["eval_rewards/chosen"] == 0.0
    else:  # against the base, the SFT adapter already has rewards
      assert rewards != 0.0


def test_bad_preference_options_and_data(pairs, tmp_path):
  with pytest.raises(ValueError, match="reference init needs --init-adapter"):
    TrainConfig(task="dpo", reference="init")
  with pytest.raises(ValueError, match="label_smoothing applies to --loss-type robust only"):
    TrainConfig(task="dpo", label_smoothing=0.1)
  with pytest.raises(UserError, match="--task kto needs --batch-size 2 or more"):
    _run(tmp_path / "kto", pairs, task="kto", batch_size=1)
  bad = tmp_path / "same.jsonl"
  bad.write_text(json.dumps({"prompt": "Q", "chosen": " a", "rejected": " a"}) + "\n")
  with pytest.raises(jlora.data.DataError, match=r"same.jsonl:1: .*chosen.*rejected"):
    run(TrainConfig(task="dpo", data=str(bad), output_dir=str(tmp_path / "x"), **SHORT))
  assert not (tmp_path / "x").exists()
