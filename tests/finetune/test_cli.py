"""What a user meets on the command line: one-line user errors (exit 2, no traceback), bugs keep theirs.

Every case runs the real command in a subprocess and fails before any model is compiled.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from cli_runs import assert_user_error, finetune, generate

from jlora.finetune import cli
from jlora.finetune.config import DEFAULT_MODEL

GOOD_LINE = json.dumps({"prompt": "Reverse the words: a b c\nAnswer:", "completion": " c b a"})


@pytest.fixture
def files(tmp_path):
  (tmp_path / "empty.jsonl").write_text("")
  (tmp_path / "bad.jsonl").write_text(GOOD_LINE + "\n{not json\n")
  (tmp_path / "learning_rate.toml").write_text("learning_rate = 1e-4\n")
  (tmp_path / "typed.toml").write_text('rank = "8"\n')
  (tmp_path / "same.jsonl").write_text(json.dumps({"prompt": "Q:", "chosen": " a b", "rejected": " a b"}) + "\n")
  (tmp_path / "no_rejected.jsonl").write_text(json.dumps({"prompt": "Q:", "chosen": " a"}) + "\n")
  (tmp_path / "roles.jsonl").write_text(json.dumps({"messages": [
      {"role": "user", "content": "hi"}, {"role": "wizard", "content": "?"}]}) + "\n")
  (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": "word " * 200, "chosen": " a", "rejected": " b"})
                                       + "\n")
  phi3 = tmp_path / "phi3"  # a model family neither jlora.models nor a transformers Flax class runs
  shutil.copytree(DEFAULT_MODEL, phi3)
  config = json.loads((phi3 / "config.json").read_text())
  (phi3 / "config.json").write_text(json.dumps({**config, "model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}))
  return tmp_path


# (arguments, fragments the one line must hold); {d} is the test's directory.
FINETUNE_CASES = {
    "no data file": (["--data", "{d}/missing.jsonl"], ["--data", "missing.jsonl", "no such file"]),
    "empty file": (["--data", "{d}/empty.jsonl"], ["--data", "empty.jsonl", "no records", "the file is empty"]),
    "malformed line": (["--data", "{d}/bad.jsonl"], ["bad.jsonl:2:", "Expecting property name", "--skip-bad-lines"]),
    "rank 0": (["--rank", "0"], ["--rank must be > 0, got 0", "LoRA rank", "Default: 8"]),
    "negative lr": (["--lr", "-1"], ["--lr must be > 0, got -1.0", "Peak learning rate"]),
    "targets match nothing": (["--targets", "q_projj"], ["--targets 'q_projj'", "are not modules of",
                                                         "(llama)", "q_proj", "all-linear"]),
    "unknown config key": (["--config", "{d}/learning_rate.toml"], ["learning_rate.toml", "unknown option "
                                                                    "'learning_rate'", "did you mean 'lr'?"]),
    "config value of the wrong type": (["--config", "{d}/typed.toml"], ["typed.toml: rank must be an integer, "
                                                                        "got str '8'"]),
    "unknown flag": (["--learning-rate", "1e-4"], ["unknown option --learning-rate; did you mean --lr?"]),
    "no model directory": (["--model", "{d}/no-model"], ["--model", "no-model", "is not a directory"]),
    "unsupported model type": (["--model", "{d}/phi3"], ["--model", "phi3", "model_type 'phi3'", "llama"]),
    "chosen equals rejected": (["--task", "dpo", "--data", "{d}/same.jsonl"], ["same.jsonl:1:", "chosen",
                                                                                "rejected"]),
    "a preference field missing": (["--task", "dpo", "--data", "{d}/no_rejected.jsonl"], ["no_rejected.jsonl:1:",
                                                                                         "rejected"]),
    "an unknown role": (["--data", "{d}/roles.jsonl"], ["roles.jsonl:1:", "'wizard'"]),
    "a prompt that leaves no room for the answer": (["--task", "dpo", "--data", "{d}/long.jsonl", "--eval-data",
                                                     "{d}/long.jsonl", "--max-seq-len", "32"],
                                                    ["long.jsonl:1:", "prompt", "--max-seq-len"]),
    "nothing left to train on": (["--data", "{d}/bad.jsonl", "--skip-bad-lines"], [
        "1 example(s), and 1 of them are held out", "--eval-data"]),
    "longer than the model's positions": (["--max-seq-len", "4096"], [
        "--max-seq-len 4096 exceeds", "256 positions", "max_position_embeddings", "--max-seq-len 256 or less"]),
}


@pytest.mark.parametrize("case", FINETUNE_CASES)
def test_finetune_user_errors_are_one_line(case, files):
  args, fragments = FINETUNE_CASES[case]
  out = files / "out"
  res = finetune(*[a.format(d=files) for a in args], "--output-dir", str(out))
  assert_user_error(res, "jlora-finetune", *fragments)
  assert not out.exists()  # a run that fails before training leaves no output directory behind


@pytest.mark.parametrize("where", ["file", "proc"])
def test_an_output_dir_that_cannot_be_written_is_one_line(where, files):
  # (as root, permissions do not stop a write: a path under a file, and /proc, stop everyone)
  out = files / "empty.jsonl" / "run" if where == "file" else f"/proc/jlora-test-{os.getpid()}/run"
  res = finetune("--output-dir", str(out), "--steps", "1")
  assert_user_error(res, "jlora-finetune", "--output-dir", "give another --output-dir" if where == "file"
                    else "cannot write there")


def test_generate_user_errors_are_one_line(tmp_path):
  not_adapter = tmp_path / "not-an-adapter"
  not_adapter.mkdir()
  peft_elsewhere = tmp_path / "peft"
  peft_elsewhere.mkdir()
  (peft_elsewhere / "adapter_config.json").write_text(json.dumps(
      {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
       "base_model_name_or_path": "meta-llama/Llama-3.2-1B"}))
  biased = tmp_path / "biased"
  biased.mkdir()
  (biased / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_bias": True, "r": 2}))
  cases = [
      (["--prompt", "x", "--adapter", str(tmp_path / "missing")], ["--adapter", "missing", "no such directory"]),
      (["--prompt", "x", "--adapter", str(not_adapter)], ["is neither a jlora adapter", "nor a PEFT adapter"]),
      (["--prompt", "x", "--adapter", str(peft_elsewhere)], ["'meta-llama/Llama-3.2-1B'", "--model"]),
      (["--prompt", "x", "--adapter", str(biased)], ["LoRA biases", "not supported"]),
      (["--prompt", "x", "--model", str(tmp_path / "no-model")], ["--model", "is not a directory"]),
      (["--adapter", str(not_adapter)], ["give at least one --prompt"]),
      (["--prompt", "x", "--max-new-tokens", "0"], ["--max-new-tokens must be >= 1"]),
      (["--prompt", "x", "--check_base"], ["unknown option --check_base; did you mean --check-base?"]),
  ]
  for args, fragments in cases:
    assert_user_error(generate(*args), "jlora-generate", *fragments)


def test_generate_refuses_a_wrong_base_and_a_damaged_adapter(short_run, tmp_path):
  """A jlora or PEFT adapter of one base, loaded onto another base of the same shapes; truncated arrays."""
  from jlora.finetune import model as model_lib

  other = tmp_path / "other-base"
  shutil.copytree(DEFAULT_MODEL, other)
  loaded = model_lib.load(str(other))
  import jax

  model_lib.save_pretrained(loaded, str(other), jax.tree.map(lambda x: x * 1.01, loaded.params))
  for adapter in ("adapter", "peft"):
    line = assert_user_error(
        generate("--adapter", str(short_run / adapter), "--model", str(other), "--prompt", "x"),
        "jlora-generate", "fingerprint", "--model", "--no-check-base")
    assert line.count("fingerprint") >= 2  # both the adapter's base and this base are named
  # A PEFT adapter that records no base (as PEFT itself writes them) loads, with one warning line.
  from safetensors.numpy import load_file, save_file

  unverified = tmp_path / "unverified"
  shutil.copytree(short_run / "peft", unverified)
  weights = unverified / "adapter_model.safetensors"
  save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})
  res = generate("--adapter", str(unverified), "--prompt", "Reverse the words: a b c\nAnswer:",
                 "--max-new-tokens", "2")
  assert res.returncode == 0, res.stderr[-3000:]
  warnings = [l for l in res.stderr.splitlines() if l.startswith("jlora-generate: warning:")]
  assert warnings == [f"jlora-generate: warning: PEFT adapter '{unverified}' records no base-model fingerprint "
                      "(it was not exported by jlora), so jlora cannot verify that it is loaded onto the base it "
                      "was trained on; make sure it is."], res.stderr
  assert res.stdout.count(f"[{unverified} (merged)]") == 1
  damaged = tmp_path / "damaged"
  shutil.copytree(short_run / "adapter", damaged)
  for p in (damaged / "adapters").rglob("*"):
    if p.is_file() and p.parent.name == "d":
      p.write_bytes(p.read_bytes()[:10])
  assert_user_error(generate("--adapter", str(damaged), "--prompt", "x"), "jlora-generate",
                    f"--adapter '{damaged}': cannot read it")


def test_bugs_keep_their_traceback(tmp_path, monkeypatch, capsys):
  """Only the listed user-error types become one line; anything else propagates unchanged."""
  def bug():
    raise TypeError("a bug")

  with pytest.raises(TypeError, match="a bug"):
    cli.run_command("demo", bug)

  def user_error():
    raise cli.UserError("--rank must be > 0,\n got 0")

  assert cli.run_command("demo", user_error) == 2
  assert capsys.readouterr().err == "demo: error: --rank must be > 0, got 0\n"


def test_help_says_what_each_option_does():
  import dataclasses

  from jlora.finetune.config import TrainConfig, build_parser, option_help

  text = " ".join(build_parser().format_help().split())
  for f in dataclasses.fields(TrainConfig):
    assert " ".join(option_help(f.name).split()) in text, f.name
  assert "(default: None)" not in text
  for flag in ("--overwrite", "--no-resume", "--print-config", "--config FILE"):
    assert flag in text
  gen = " ".join(__import__("jlora.generate", fromlist=["_parser"])._parser().format_help().split())
  assert "--no-check-base" in gen and "--bf16" in gen


def test_print_config_is_the_documented_config_file(tmp_path):
  """examples/configs/all_options.toml is generated from the same field help (and reads back)."""
  from jlora.finetune.config import TrainConfig, config_template, load_config_file, parse_args

  path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "configs", "all_options.toml")
  with open(path) as f:
    assert f.read() == config_template(), "regenerate: jlora-finetune --print-config > " + path
  cfg, _ = parse_args(["--config", path])
  assert cfg == TrainConfig()
  custom = tmp_path / "c.toml"
  custom.write_text(config_template(TrainConfig(rank=4, lr=1e-3, targets="q_proj,v_proj", bf16=True)))
  assert load_config_file(str(custom))["rank"] == 4
  assert parse_args(["--config", str(custom)])[0] == TrainConfig(rank=4, lr=1e-3, targets="q_proj,v_proj",
                                                                 bf16=True)


@pytest.mark.parametrize("kind", ["Task", "Future"])
def test_abandoned_tensorstore_reads_are_not_logged(kind):
  """The noise a failed Orbax restore leaves behind is dropped; other asyncio errors are not."""
  import logging

  keep = cli._AbandonedTensorStoreRead()

  def record(msg, exc):
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, (type(exc), exc, None))

  abandoned = ValueError('OUT_OF_RANGE: Error opening "zarr" driver [tensorstore_spec=\'{}\']')
  assert not keep.filter(record(f"{kind} exception was never retrieved\nfuture: <...>", abandoned))
  assert keep.filter(record(f"{kind} exception was never retrieved", ValueError("a real bug")))
  assert keep.filter(record("something else", abandoned))
