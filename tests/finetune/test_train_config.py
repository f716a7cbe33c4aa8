"""The fine-tuning command's options: defaults < config file < flags, with clear errors."""

import json

import pytest

from jlora.finetune.config import TrainConfig, parse_args


def test_precedence(tmp_path):
  f = tmp_path / "c.toml"
  f.write_text('rank = 4\nlr = 1\nbatch-size = 3\n')
  cfg, ns = parse_args(["--config", str(f), "--rank", "6", "--bf16", "--no-resume"])
  assert (cfg.rank, cfg.lr, cfg.batch_size, cfg.bf16, ns.resume) == (6, 1.0, 3, True, False)
  j = tmp_path / "c.json"
  j.write_text(json.dumps({"targets": "q_proj,v_proj", "steps": 5}))
  cfg, _ = parse_args(["--config", str(j)])
  assert (cfg.targets, cfg.steps) == ("q_proj,v_proj", 5)


def test_errors(tmp_path):
  from jlora.finetune.cli import OptionError, UserError

  f = tmp_path / "c.toml"
  f.write_text("rnak = 4\n")
  with pytest.raises(UserError, match=r"c.toml: unknown option 'rnak'; did you mean 'rank'\?"):
    parse_args(["--config", str(f)])
  f.write_text("[lora]\nrank = 4\n")
  with pytest.raises(UserError, match=r"unknown option 'lora' \(options are top-level keys, not tables\)"):
    parse_args(["--config", str(f)])
  f.write_text("gradient_accumulation_steps = 4\n")
  with pytest.raises(UserError, match=r"did you mean 'grad_accum'\?"):
    parse_args(["--config", str(f)])
  with pytest.raises(OptionError, match="TrainConfig.rank must be > 0"):
    TrainConfig(rank=0)
  with pytest.raises(OptionError, match="TrainConfig.schedule must be one of cosine, linear, constant"):
    TrainConfig(schedule="exp")
  with pytest.raises(OptionError, match="TrainConfig.steps must be > 0 when epochs is 0"):
    TrainConfig(steps=0, epochs=0)
  with pytest.raises(OptionError, match=r"TrainConfig.rank must be an integer, got str '8'"):
    TrainConfig(rank="8")
  with pytest.raises(OptionError, match=r"TrainConfig.bf16 must be true or false, got int 1"):
    TrainConfig(bf16=1)
  with pytest.raises(OptionError, match=r"TrainConfig.lora_dropout must be in \[0, 1\), got 1.0"):
    TrainConfig(lora_dropout=1.0)
  with pytest.raises(OptionError, match=r"TrainConfig.exclude is not a valid regex"):
    TrainConfig(exclude="(")
  with pytest.raises(OptionError, match=r"TrainConfig.process_id must be < num_processes \(2\), got 2"):
    TrainConfig(num_processes=2, process_id=2)
  with pytest.raises(ValueError, match=r"TrainConfig: unknown option\(s\) 'rnak' \(did you mean 'rank'\?\)"):
    TrainConfig(rnak=4)
  with pytest.raises(UserError, match=r"--config .*missing.toml.*: no such file"):
    parse_args(["--config", str(tmp_path / "missing.toml")])
  y = tmp_path / "c.yaml"
  y.write_text("rank: 2")
  with pytest.raises(UserError, match="use a .toml or .json file"):
    parse_args(["--config", str(y)])
  j = tmp_path / "c.json"
  j.write_text("[1, 2]")
  with pytest.raises(UserError, match="must hold a table/object of options, got list"):
    parse_args(["--config", str(j)])
  # A value from the file is reported as that file's key; from a flag, as the flag.
  f.write_text("lr = -1\n")
  with pytest.raises(UserError, match=r"c.toml: lr must be > 0, got -1.0\. --lr: Peak learning rate"):
    parse_args(["--config", str(f)])
  with pytest.raises(UserError, match=r"^--lr must be > 0, got -2.0"):
    parse_args(["--config", str(f), "--lr", "-2"])
  with pytest.raises(UserError, match="--overwrite starts fresh, --resume continues"):
    parse_args(["--overwrite", "--resume"])


def test_flag_errors_are_one_line(tmp_path, capsys):
  from jlora.finetune.cli import UserError

  broken = tmp_path / "broken.toml"
  broken.write_text("rank = \n")
  with pytest.raises(UserError, match=r"--config .*broken.toml: not valid TOML: .*line 1"):
    parse_args(["--config", str(broken)])
  for argv, line in [(["--rank", "eight"], "argument --rank: invalid int value: 'eight'"),
                     (["--gradient-accumulation-steps", "2"], "unknown option --gradient-accumulation-steps; "
                                                               "did you mean --grad-accum?"),
                     (["stray"], "unexpected argument 'stray'; every option is a --flag")]:
    with pytest.raises(SystemExit) as e:
      parse_args(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"jlora-finetune: error: {line} (see --help)\n"


def test_resume_and_overwrite_flags():
  assert parse_args([])[1].resume is True
  _, ns = parse_args(["--overwrite"])
  assert (ns.resume, ns.overwrite) == (False, True)
