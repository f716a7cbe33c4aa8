"""Running the commands as a user does (subprocesses) and checking what a user sees."""

from __future__ import annotations

import subprocess
import sys

from helpers import command_env

# 4 steps of batch 4 x 32 tokens, rank 2, checkpoints at steps 2 and 4, no generation.
SHORT = ["--steps", "4", "--save-every", "2", "--batch-size", "4", "--max-seq-len", "32", "--rank", "2",
         "--log-every", "1", "--eval-every", "1000", "--eval-exact-match", "-1", "--no-progress"]


def finetune(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
  """``python -m jlora.finetune ARGS`` in a subprocess, as a user runs it."""
  return subprocess.run([sys.executable, "-m", "jlora.finetune", *args], capture_output=True, text=True,
                        timeout=timeout, env=command_env())


def generate(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
  """``python -m jlora.generate ARGS`` in a subprocess."""
  return subprocess.run([sys.executable, "-m", "jlora.generate", *args], capture_output=True, text=True,
                        timeout=timeout, env=command_env())


def assert_user_error(res: subprocess.CompletedProcess, prog: str, *fragments: str) -> str:
  """A user error as the issue defines it: exit status 2, one stderr line naming the problem, no traceback."""
  lines = [l for l in res.stderr.splitlines() if l.strip()]
  assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-4000:])
  assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
  assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), res.stderr
  for f in fragments:
    assert f in lines[0], (f, lines[0])
  return lines[0]
