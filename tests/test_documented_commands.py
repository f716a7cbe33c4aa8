"""Every command the documentation shows is run by a test, and its arguments parse.

The commands are read from README.md, docs/*.md and tpu_scripts/README.md (```bash blocks and
inline code) and from the usage lines of the benchmarks' and examples' docstrings: those that
start with ``python -m jlora.``, ``jlora-finetune``, ``jlora-generate``, ``python benchmarks/``,
``python examples/`` or ``python tpu_scripts/``. Inline flags (such as ``--shapes mha_t256 --rounds 5``)
that follow a benchmark's or an example's command in the same section (or list item) belong to it.

* ``COVERAGE`` maps each program to the test files that run it end to end; a documented program
  missing there fails with the file and line that show it, and each listed test file must
  mention the program (so that the map cannot rot either);
* each command's arguments go through the program's own parser without running anything (the
  scripts in one subprocess, ``tests/smoke_runs.py --parse-only``; the jlora commands here).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shlex

import pytest
from smoke_runs import REPO, run_group, smoke_env

DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))),
        "tpu_scripts/README.md"]
# Scripts whose docstring usage lines are documentation too.
SCRIPTS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "benchmarks", "*.py"))
                 + glob.glob(os.path.join(REPO, "examples", "*.py")))
NOT_RUN = {"benchmarks/_common.py": "helpers shared by the benchmarks, not a program"}

# program -> test files that run it end to end (on the bundled base where a model is involved).
COVERAGE = {
    "jlora-finetune": ["tests/finetune/test_train.py", "tests/finetune/conftest.py", "tests/finetune/test_cli.py",
                       "tests/finetune/test_user_install.py", "tests/sharding/test_multihost.py"],
    "jlora-generate": ["tests/finetune/test_cli.py", "tests/finetune/test_options.py", "tests/multi/test_serve.py",
                       "tests/finetune/test_user_install.py"],
    "jlora.memory": ["tests/memory/test_memory_command.py"],  # --model DIR and --model gpt3-175b
    "tpu_scripts/tpu.py": ["tests/test_tpu_scripts.py"],
    **{f"benchmarks/{name}.py": ["tests/test_benchmarks_smoke.py"]
       for name in ("train_step", "dora_step", "qlora", "compile_time", "forward", "collectives",
                    "reproducible_numerics")},
    **{f"benchmarks/{name}.py": ["tests/test_benchmarks_smoke_more.py"]
       for name in ("models", "many_adapters", "bank_strategies", "memory_gpt3", "expert_lora")},
    "benchmarks/moe_dispatch.py": ["tests/models/test_moe_benchmark.py"],
    **{f"benchmarks/{name}.py": ["tests/objectives/test_benchmarks.py"]
       for name in ("chunked_logits", "dpo_step", "grpo_step")},
    **{f"examples/{name}.py": ["tests/test_examples.py"]
       for name in ("make_dataset", "make_tiny_base", "convert_flax_checkpoint", "serve_many", "lorahub_words",
                    "preference_words", "grpo_words")},
}
# What a test file must contain to count as running the program (a script: its path).
RUNS = {"jlora-finetune": ('"-m", "jlora.finetune"', 'finetune("'),
        "jlora-generate": ('"-m", "jlora.generate"', 'generate("', "from jlora.generate import main"),
        "jlora.memory": ('"-m", "jlora.memory"',), "tpu_scripts/tpu.py": ('"--dry-run"',)}
# Placeholders the documentation writes in argument values, and what the parsers are given instead.
PLACEHOLDERS = {"N": "2", "I": "0", "HOST:PORT": "10.0.0.1:1234"}


@dataclasses.dataclass(frozen=True)
class Command:
  where: str  # file:line
  text: str  # as documented
  program: str  # jlora-finetune, jlora-generate, jlora.memory, benchmarks/x.py, examples/x.py, tpu_scripts/tpu.py
  args: tuple
  elided: bool  # "..." stands for arguments left out


def _program(tokens: list[str]) -> tuple[str, list[str]] | None:
  if tokens and tokens[0] in ("jlora-finetune", "jlora-generate"):
    return tokens[0], tokens[1:]
  if len(tokens) < 2 or tokens[0] not in ("python", "python3"):
    return None
  if tokens[1] == "-m" and len(tokens) > 2 and tokens[2].startswith("jlora."):
    name = tokens[2]
    return {"jlora.finetune": "jlora-finetune", "jlora.generate": "jlora-generate"}.get(name, name), tokens[3:]
  if tokens[1].startswith(("benchmarks/", "examples/", "tpu_scripts/")) and tokens[1].endswith(".py"):
    return tokens[1], tokens[2:]
  return None


def _commands(text: str, where: str) -> list[Command]:
  """The documented commands in one shell line (``&&``-chained, ``# comments`` dropped)."""
  text = re.sub(r"<[^>]*>", "PLACEHOLDER", text)  # <preset or HF dir>
  try:
    tokens = shlex.split(text, comments=True)
  except ValueError:
    return []
  out, segment = [], []
  for tok in [*tokens, "&&"]:
    if tok not in ("&&", "||", ";", "|"):
      segment.append(tok)
      continue
    found = _program(segment)
    if found:
      program, args = found
      elided = "..." in args
      args = [PLACEHOLDERS.get(a, a) for a in args if a != "..."]
      out.append(Command(where, " ".join(segment), program, tuple(args), elided))
    segment = []
  return out


def _markdown(doc: str) -> list[tuple[str, int, str]]:
  """``(kind, line, text)`` units of a markdown file: "heading", "bash" (one logical shell line: continuations
  joined), "text" (a paragraph, whose inline code may run over a line break) and "item" (a list item)."""
  with open(os.path.join(REPO, doc)) as f:
    lines = f.read().splitlines()
  units, fence, para, i = [], None, [], 0

  def flush():
    if para:
      kind = "item" if re.match(r"\s*([*-]|\d+\.) ", para[0][1]) else "text"
      units.append((kind, para[0][0], "\n".join(t for _, t in para)))
      para.clear()

  while i < len(lines):
    line, start = lines[i], i + 1
    if line.lstrip().startswith("```"):
      flush()
      fence = None if fence is not None else line.strip()[3:].strip()
    elif fence == "bash":
      while line.endswith("\\") and i + 1 < len(lines):
        i += 1
        line = line[:-1] + " " + lines[i].strip()
      units.append(("bash", start, line))
    elif fence is None and line.startswith("#"):
      flush()
      units.append(("heading", start, line))
    elif fence is None and line.strip():
      if re.match(r"\s*([*-]|\d+\.) ", line):  # a list item starts a paragraph of its own
        flush()
      para.append((start, line))
    elif fence is None:
      flush()
    i += 1
  flush()
  return units


def documented_commands() -> list[Command]:
  found: list[Command] = []
  for doc in DOCS:
    script = None  # the section's or list item's last benchmark or example: inline flags that follow it there belong to it
    for kind, line, text in _markdown(doc):
      if kind in ("heading", "item"):  # a new section or list item (a title may show a command too)
        script = None
      spans = [(text, 0)] if kind == "bash" else [(m.group(1).replace("\n", " "), text[:m.start()].count("\n"))
                                                  for m in re.finditer(r"`([^`]+)`", text)]
      for span, offset in spans:
        where = f"{doc}:{line + offset}"
        if kind != "bash" and span.startswith("--") and script:
          cmds = [Command(where, span, script, tuple(shlex.split(span)), False)]
        elif kind == "bash" or span.startswith(("python ", "python3 ", "jlora-")):
          cmds = _commands(span, where)
        else:
          continue
        found += cmds
        script = next((c.program for c in reversed(cmds) if c.program.startswith(("benchmarks/", "examples/"))),
                      script)
  for script in SCRIPTS:
    if script in NOT_RUN:
      continue
    with open(os.path.join(REPO, script)) as f:
      usage = f.read().split('"""')[1]
    for n, line in enumerate(usage.splitlines(), start=2):
      if line.strip().startswith("python "):
        found += _commands(line.strip(), f"{script}:{n}")
  return found


COMMANDS = documented_commands()


def test_the_documentation_shows_commands():
  programs = {c.program for c in COMMANDS}
  assert {"jlora-finetune", "jlora-generate", "jlora.memory", "tpu_scripts/tpu.py", "benchmarks/train_step.py",
          "examples/lorahub_words.py"} <= programs, programs
  shown = {(c.program, c.args) for c in COMMANDS}
  assert ("benchmarks/train_step.py", ("--shapes", "mha_t256", "--rounds", "5")) in shown  # an inline fragment
  assert ("jlora.memory", ("--model", "gpt3-175b")) in shown


def test_every_documented_program_is_run_by_a_test():
  missing = [f"{c.where}: `{c.text}` ({c.program} is run by no test: add it to COVERAGE in {__file__})"
             for c in COMMANDS if c.program not in COVERAGE]
  assert not missing, "\n".join(missing)
  for program, tests in COVERAGE.items():
    for test in tests:
      path = os.path.join(REPO, test)
      assert os.path.isfile(path), f"COVERAGE[{program!r}]: {test} does not exist"
      with open(path) as f:
        text = f.read()
      assert any(m in text for m in RUNS.get(program, (program,))), f"COVERAGE[{program!r}]: {test} does not run it"


def test_every_benchmark_and_example_is_covered():
  """Also those no document shows: each has its smoke run (or is listed in NOT_RUN with the reason)."""
  uncovered = [s for s in SCRIPTS if s not in COVERAGE and s not in NOT_RUN]
  assert not uncovered, f"no test runs {uncovered}: give each a --smoke mode and a test, and add it to COVERAGE"


SCRIPT_COMMANDS = [c for c in COMMANDS if c.program.endswith(".py")]
SMOKE_FLAGS = [Command(f"{s} (smoke mode)", f"python {s} --smoke", s, ("--smoke",), False)
               for s in SCRIPTS if s.startswith("benchmarks/") and s not in NOT_RUN]


@pytest.fixture(scope="module")
def parsed() -> dict:
  """(script, args) -> its parse-only run: the script parses the arguments and stops there (one subprocess)."""
  todo = list(dict.fromkeys((c.program, c.args) for c in [*SCRIPT_COMMANDS, *SMOKE_FLAGS]))
  run = run_group([[p, *a] for p, a in todo], env=smoke_env(), parse_only=True, timeout=300)
  assert len(run.steps) == len(todo), run.stdout[-3000:] + run.stderr[-3000:]
  return {(r.script, tuple(r.args)): r for r in run.steps}


def _accept(c: Command, status: str, error: str) -> bool:
  if status == "parsed" or (status == "exit 0" and "--help" in c.args):
    return True
  # an elided command may leave out required arguments; any other error (an unknown flag, a bad value) counts
  return c.elided and "the following arguments are required" in error


@pytest.mark.parametrize("c", [*SCRIPT_COMMANDS, *SMOKE_FLAGS], ids=lambda c: f"{c.where} {c.program}")
def test_script_arguments_parse(c, parsed):
  r = parsed[(c.program, c.args)]
  assert _accept(c, r.status, r.error), f"{c.where}: `{c.text}` does not parse: {r.status}\n{r.error}"


def _finetune(args):
  from jlora.finetune.config import parse_args

  return parse_args(list(args))


def _generate(args):
  from jlora.generate import _parser

  return _parser().parse_args(list(args))


def _memory(args, monkeypatch):
  from jlora.memory.__main__ import main

  class Parsed(Exception):
    pass

  original = argparse.ArgumentParser.parse_args

  def parse_only(self, args=None, namespace=None):
    raise Parsed(original(self, args, namespace))

  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
  with pytest.raises(Parsed):
    main(list(args))


JLORA_COMMANDS = [c for c in COMMANDS if not c.program.endswith(".py")]
# What tpu_scripts/tpu.py passes on to the fine-tuning command (after "--"), checked as such.
JLORA_COMMANDS += [Command(c.where, c.text, "jlora-finetune", c.args[c.args.index("--") + 1:], c.elided)
                   for c in COMMANDS if c.program == "tpu_scripts/tpu.py" and "--" in c.args]


@pytest.mark.parametrize("c", JLORA_COMMANDS, ids=lambda c: f"{c.where} {c.program}")
def test_jlora_command_arguments_parse(c, monkeypatch, capsys):
  try:
    if c.program == "jlora-finetune":
      _finetune(c.args)
    elif c.program == "jlora-generate":
      _generate(c.args)
    elif c.program == "jlora.memory":
      _memory(c.args, monkeypatch)
    else:
      pytest.fail(f"{c.where}: no parser known for {c.program}")
  except SystemExit as e:
    err = capsys.readouterr().err
    assert e.code == 0 and "--help" in c.args, f"{c.where}: `{c.text}` does not parse: {err}"
