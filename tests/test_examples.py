"""Every ``examples/*.py`` runs, as its users run it, on inputs as small as its code allows.

make_dataset.py runs as is (no JAX; it must reproduce the bundled data byte for byte); the others
in their ``--smoke`` mode, or on an input this test writes (a Flax checkpoint for
convert_flax_checkpoint.py), all in one process (tests/smoke_runs.py) so that JAX and transformers
are imported once.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
from smoke_runs import REPO, run_group, smoke_env

BUNDLED_DATA = os.path.join(REPO, "jlora", "assets", "data")
# lorahub_words.py --smoke fine-tunes these task adapters with the real command (2 steps each);
# tests/example_inputs.py writes the others (each fine-tuning run is a process: ~6 s of CPU).
TRAINED = ("reverse",)
GIVEN = ("sort", "upper", "drop_first")


def numbers(pattern: str, text: str) -> list[float]:
  found = [float(x) for x in re.findall(pattern, text)]
  assert found and all(math.isfinite(x) for x in found), (pattern, text[-2000:])
  return found


def test_make_dataset_reproduces_the_bundled_data(tmp_path):
  res = subprocess.run([sys.executable, "examples/make_dataset.py", "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  for stem in ("reverse_words", "reverse_words_pref", "word_chats"):
    for name, n in (("train", 3000 if stem == "reverse_words" else 1000), ("eval", 200)):
      path = tmp_path / f"{stem}.{name}.jsonl"
      assert f"wrote {n} examples to {path}" in res.stdout
      with open(os.path.join(BUNDLED_DATA, f"{stem}.{name}.jsonl"), "rb") as f:
        assert path.read_bytes() == f.read(), f"examples/make_dataset.py no longer writes the bundled {path.name}"
    first = json.loads(path.read_text().splitlines()[0])
    fields = {"reverse_words": {"prompt", "completion"}, "reverse_words_pref": {"prompt", "chosen", "rejected"},
              "word_chats": {"messages"}}[stem]
    assert set(first) == fields, (path.name, sorted(first))


@pytest.fixture(scope="module")
def group(tmp_path_factory):
  t = tmp_path_factory.mktemp("examples")
  steps = [["tests/example_inputs.py", "flax-checkpoint", str(t / "flax")],
           ["examples/convert_flax_checkpoint.py", str(t / "flax"), str(t / "converted")],
           ["examples/make_tiny_base.py", "--smoke", "--out", str(t / "tiny-base")],
           ["examples/serve_many.py", "--smoke", "--out", str(t / "serve_many.json")],
           ["tests/example_inputs.py", "adapters", str(t / "hub"), *GIVEN],
           ["examples/lorahub_words.py", "--smoke", "--out", str(t / "hub")],
           ["examples/preference_words.py", "--smoke", "--out", str(t / "pref")],
           ["examples/grpo_words.py", "--smoke", "--out", str(t / "grpo")]]
  run = run_group(steps, env=smoke_env())
  print(f"examples smoke group: {run.summary()}")
  run.out = t
  return run


def test_convert_flax_checkpoint(group):
  group.ok("tests/example_inputs.py")
  run = group.ok("examples/convert_flax_checkpoint.py")
  src, dst = group.out / "flax", group.out / "converted"
  # transformers' own Flax model and jlora's native decoder compute the same logits from both files
  pattern = r"logits: native vs transformers Flax: max abs diff (\S+) \(max \|logit\| (\S+)\); argmax equal: True"
  (diff, scale), = [tuple(map(float, m)) for m in re.findall(pattern, run.stdout)]
  assert 0 < scale and diff <= 1e-5 * scale, (diff, scale)
  assert f"wrote {dst / 'model.safetensors'}" in run.stdout
  assert {"config.json", "generation_config.json", "model.safetensors"} <= set(os.listdir(dst))
  assert "flax_model.msgpack" not in os.listdir(dst)  # the other files copied, not the Flax weights
  assert (src / "flax_model.msgpack").exists()  # converted elsewhere: the source is left alone
  from safetensors import safe_open

  with safe_open(dst / "model.safetensors", "np") as f:
    shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
  assert shapes["model.embed_tokens.weight"] == [128, 32] and shapes["lm_head.weight"] == [128, 32]
  assert shapes["model.layers.1.self_attn.k_proj.weight"] == [16, 32]  # 2 KV heads of 8


def test_make_tiny_base(group):
  run = group.ok("examples/make_tiny_base.py")
  out = group.out / "tiny-base"
  assert f"wrote {out}" in run.stdout
  (val,) = numbers(r"val loss (\S+) \(ppl", run.stdout)
  with open(out / "pretraining.json") as f:
    info = json.load(f)
  assert info["val_loss"] == pytest.approx(val, abs=1e-3) and info["steps"] == 2
  with open(out / "config.json") as f:
    config = json.load(f)
  assert config["hidden_size"] == 32 and config["num_hidden_layers"] == 1 and config["vocab_size"] == 300
  (n_params,) = numbers(r"params ([\d,]+); val loss", run.stdout.replace(",", ""))
  import jax

  import jlora.models

  model, params = jlora.models.load(str(out))  # reads what it wrote (no computation)
  assert (model.config.vocab_size, model.config.hidden_size) == (300, 32)
  assert sum(x.size for x in jax.tree.leaves(params)) == n_params == info["params"]
  from tokenizers import Tokenizer

  tok = Tokenizer.from_file(str(out / "tokenizer.json"))
  assert tok.get_vocab_size() == 300 and tok.decode(tok.encode("def f(x): return x").ids) == "def f(x): return x"


def test_serve_many(group):
  """The script checks that each row of the 4-adapter batch is what its adapter generates alone."""
  run = group.ok("examples/serve_many.py")
  with open(group.out / "serve_many.json") as f:
    result = json.load(f)
  assert result["smoke"] is True and result["command"] == "python examples/serve_many.py --smoke"
  assert result["config"]["rows"] == 8 and result["config"]["counts"] == [1, 4]
  for name in ("merged", "single", "bank_1", "bank_4", "bank_4_onehot"):
    assert math.isfinite(result["generate_tokens_per_s"][name]) and result["generate_tokens_per_s"][name] > 0
  assert result["throughput_over_single"]["single"] == 1
  assert f"wrote {group.out / 'serve_many.json'}" in run.stdout


def test_lorahub_words(group):
  run = group.ok("examples/lorahub_words.py")
  for task in GIVEN:
    assert f"[{task}] adapter exists: {group.out / 'hub' / task / 'adapter'}" in run.stdout
  for task in TRAINED:  # by the fine-tuning command, as the example does it
    assert re.search(rf"\$ \S+ -m jlora\.finetune --data \S+/{task}\.train\.jsonl .*--steps 2 ", run.stdout)
    assert f"[{task}] trained in" in run.stdout
    assert (group.out / "hub" / task / "adapter").is_dir()
  with open(group.out / "hub" / "results.json") as f:
    result = json.load(f)
  assert result["smoke"] is True and result["shots"] == 4 and result["budget"] == 2
  assert set(result["tasks"]) == {"reverse_in_capitals"}  # --smoke: the first unseen task
  for name, task in result["tasks"].items():
    rows = task["results"]
    assert set(rows) == {"base", "uniform average", "reverse adapter", "sort adapter", "upper adapter",
                         "drop_first adapter", "LoRAHub (1+1)-ES", "LoRAHub adam"}
    for row in rows.values():
      assert all(math.isfinite(v) for v in row.values()), row
      assert 0 <= row["token_accuracy"] <= 1 and 0 <= row["exact_match"] <= 1
    for hub in task["lorahub"].values():
      assert len(hub["weights"]) == 4 and math.isfinite(hub["objective"])
    numbers(rf"\[{name}\]\s+LoRAHub adam: few-shot loss (\S+) \|", run.stdout)


def test_lorahub_words_trains_with_the_fine_tuning_command_it_documents(tmp_path):
  """The command lorahub_words.py runs per task parses as the fine-tuning command's options (smoke and real)."""
  sys.path.insert(0, os.path.join(REPO, "examples"))
  try:
    import lorahub_words
  finally:
    sys.path.pop(0)
  from jlora.finetune.config import parse_args

  for extra in ((), lorahub_words.SMOKE_FINETUNE):
    cmd = lorahub_words.train_command("d.jsonl", "e.jsonl", str(tmp_path / "out"), 400, extra)
    assert cmd[:3] == [sys.executable, "-m", "jlora.finetune"]
    cfg, _ = parse_args(cmd[3:])
    assert cfg.steps == 400 and cfg.eval_exact_match == -1


def test_preference_words(group):
  run = group.ok("examples/preference_words.py")
  with open(group.out / "pref" / "results.json") as f:
    result = json.load(f)
  assert result["smoke"] is True and set(result["runs"]) == {"sft", "dpo-from-sft", "simpo-from-sft"}
  for name, r in result["runs"].items():
    assert r["command"].startswith("python -m jlora.finetune ") and "$ -m jlora.finetune" in run.stdout
    if name != "sft":
      assert 0 <= r["after"]["eval_rewards/accuracies"] <= 1 and 0 <= r["after"]["exact_match"] <= 1
  assert result["runs"]["dpo-from-sft"]["before"]["eval_rewards/margins"] == 0.0  # the reference is the start
  assert (group.out / "pref" / "preference_accuracy.png").stat().st_size > 1000


def test_grpo_words(group):
  run = group.ok("examples/grpo_words.py")
  with open(group.out / "grpo" / "results.json") as f:
    result = json.load(f)
  assert result["smoke"] is True and set(result["runs"]) == {"sft", "grpo-from-sft", "grpo-from-base"}
  assert "$ -m jlora.finetune" in run.stdout
  for name, r in result["runs"].items():
    assert r["command"].startswith("python -m jlora.finetune "), r["command"]
    assert r["steps"] == 2 and math.isfinite(r["seconds"]) and r["seconds"] > 0
    assert 0 <= r["before"]["exact_match"] <= 1 and 0 <= r["after"]["exact_match"] <= 1
    if name != "sft":
      assert "--task grpo --reward exact_match" in r["command"]
      assert 0 <= r["before"]["eval_reward"] <= 1 and 0 <= r["after"]["eval_reward"] <= 1
      assert [s for s, _ in r["reward_curve"]] == [2]  # --log-every 2 of 2 steps
      assert all(0 <= v <= 1 for _, v in r["reward_curve"]), r["reward_curve"]
      assert 0 <= r["reward_first_quarter"] <= 1 and 0 <= r["reward_last_quarter"] <= 1
  assert f"--init-adapter {group.out / 'grpo' / 'sft' / 'adapter'}" in result["runs"]["grpo-from-sft"]["command"]
  assert "--init-adapter" not in result["runs"]["grpo-from-base"]["command"]
  numbers(r"grpo-from-sft \|\s+\S+ -> (\S+) \|", run.stdout)  # the table: the sampled reward, last quarter
  assert (group.out / "grpo" / "grpo_reward.png").stat().st_size > 1000


def test_grpo_words_runs_parse_as_the_fine_tuning_command(tmp_path):
  """The runs grpo_words.py documents (not --smoke) are what the README's table says: GRPO with exact_match."""
  sys.path.insert(0, os.path.join(REPO, "examples"))
  try:
    import grpo_words
  finally:
    sys.path.pop(0)
  from jlora.finetune.config import parse_args

  configs = {}
  for name in grpo_words.RUNS:
    cmd = grpo_words.command(name, str(tmp_path), smoke=False)
    assert cmd[:3] == [sys.executable, "-m", "jlora.finetune"]
    configs[name], _ = parse_args(cmd[3:])
  assert configs["sft"].task == "sft" and configs["sft"].steps == int(grpo_words.SFT_STEPS)
  for name in ("grpo-from-sft", "grpo-from-base"):
    cfg = configs[name]
    assert cfg.task == "grpo" and cfg.reward == ("exact_match",) and cfg.num_generations == 8
    assert cfg.batch_size % cfg.num_generations == 0
  assert configs["grpo-from-sft"].init_adapter == str(tmp_path / "sft" / "adapter")
  assert configs["grpo-from-base"].init_adapter == ""
