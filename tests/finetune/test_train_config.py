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
  f = tmp_path / "c.toml"
  f.write_text("rnak = 4\n")
  with pytest.raises(ValueError, match=r"unknown option\(s\) 'rnak' \(did you mean 'rank'\?\)"):
    parse_args(["--config", str(f)])
  with pytest.raises(ValueError, match="TrainConfig.rank must be > 0"):
    TrainConfig(rank=0)
  with pytest.raises(ValueError, match="schedule must be"):
    TrainConfig(schedule="exp")
  with pytest.raises(ValueError, match="set steps > 0 or epochs > 0"):
    TrainConfig(steps=0, epochs=0)
  with pytest.raises(FileNotFoundError):
    parse_args(["--config", str(tmp_path / "missing.toml")])
  y = tmp_path / "c.yaml"
  y.write_text("rank: 2")
  with pytest.raises(ValueError, match="use a .json or .toml file"):
    parse_args(["--config", str(y)])
