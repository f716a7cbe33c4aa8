"""A very short real run of the command, shared by the tests of its output directory."""

from __future__ import annotations

import pytest
from cli_runs import SHORT, finetune

from jlora.finetune.config import DEFAULT_EVAL


@pytest.fixture(scope="session")
def small_eval(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("data") / "eval.jsonl"
  with open(DEFAULT_EVAL) as f:
    path.write_text("".join(f.readlines()[:8]))
  return str(path)


@pytest.fixture(scope="session")
def short_run(tmp_path_factory, small_eval):
  """Output directory of a finished 4-step run (read-only: copy it before changing anything)."""
  out = tmp_path_factory.mktemp("short") / "run"
  res = finetune("--output-dir", str(out), "--eval-data", small_eval, *SHORT)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  return out
