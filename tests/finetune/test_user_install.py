"""The commands in an environment like the README's install: ``pip install -e ".[hf]"`` in a fresh venv.

The suite's own environment (``.[test]``) pins transformers 4.57.6 (for its Flax interop tests)
and has torch (which brings jinja2); a user's has neither pin nor torch: pip resolves
transformers 5.x. Both differences once broke ``--chat-template``, unseen by the suite. Here
the tokenizer and chat-template paths of both commands run in such an environment, built
once per machine and kept (``~/.cache/jlora-test-envs/<hash of pyproject.toml>``, or
``$JLORA_TEST_ENVS``) so that a rerun of the suite reuses it; a fresh CI machine builds it
(about a minute from pip's cache, needing the package index like the install itself).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from helpers import command_env

from jlora.finetune.config import DEFAULT_EVAL, DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[2]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="session")
def user_python() -> str:
  """The python of a venv holding ``pip install -e "<repo>[hf]"`` and nothing else."""
  key = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + sys.version.encode()).hexdigest()[:12]
  root = Path(os.environ.get("JLORA_TEST_ENVS", Path.home() / ".cache" / "jlora-test-envs")) / key
  python = root / "bin" / "python"
  if not (root / "complete").exists():
    shutil.rmtree(root, ignore_errors=True)
    venv.create(root, with_pip=True)
    res = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e",
                          f"{REPO}[hf]"], capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, "pip install -e .[hf] failed:\n" + res.stdout[-3000:] + res.stderr[-3000:]
    (root / "complete").write_text("")
  return str(python)


def _env() -> dict:
  env = command_env()
  env.pop("USE_TORCH", None)  # nothing to hide: torch is not installed there
  env.pop("PYTHONPATH", None)
  return env


def _run(python: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([python, *args], capture_output=True, text=True, timeout=900, env=_env(), cwd=str(REPO))


def test_the_readme_install_resolves_transformers_5_without_torch(user_python):
  res = _run(user_python, "-c", "import importlib.util as u, transformers, jinja2; "
                                "print(transformers.__version__, u.find_spec('torch') is None)")
  assert res.returncode == 0, res.stderr[-2000:]
  version, no_torch = res.stdout.split()
  assert version.split(".")[0] == "5" and no_torch == "True", res.stdout


def test_chat_template_trains_and_generates_there(user_python, tmp_path):
  model = tmp_path / "chat-base"
  shutil.copytree(DEFAULT_MODEL, model)
  config = json.loads((model / "tokenizer_config.json").read_text())
  (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
  eval_path = tmp_path / "eval.jsonl"
  with open(DEFAULT_EVAL) as f:
    eval_path.write_text("".join(f.readlines()[:8]))
  out = tmp_path / "run"
  res = _run(user_python, "-m", "jlora.finetune", "--model", str(model), "--chat-template", "--output-dir",
             str(out), "--eval-data", str(eval_path), "--steps", "2", "--batch-size", "4", "--max-seq-len", "48",
             "--rank", "2", "--eval-exact-match", "2", "--max-new-tokens", "3", "--no-progress")
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
  assert "after training:" in res.stdout
  # The adapter remembers how it was trained: jlora-generate formats the prompt the same way.
  res = _run(user_python, "-m", "jlora.generate", "--adapter", str(out / "adapter"), "--prompt",
             "Reverse the words: a b c", "--max-new-tokens", "3", "--no-merged")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "prompts: formatted with the tokenizer's chat template (as the first adapter was trained;" in res.stdout
  assert "[base] 'Reverse the words: a b c' -> " in res.stdout and "(unmerged)" in res.stdout
  # The tokenizer's output as a user's transformers 5 gives it: no token_type_ids.
  res = _run(user_python, "-c", "import sys, transformers; t = transformers.AutoTokenizer.from_pretrained("
                                "sys.argv[1]); print(sorted(t('a b c')))", str(model))
  assert res.returncode == 0 and "token_type_ids" not in res.stdout, res.stdout + res.stderr[-2000:]
