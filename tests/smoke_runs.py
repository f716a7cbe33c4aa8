"""Running the repository's scripts (benchmarks, examples) as a user does, several in one process.

Each script runs as ``python SCRIPT ARGS`` would run it: ``sys.argv`` set, its directory first on
``sys.path``, the file executed as ``__main__`` (so its ``if __name__ == "__main__"`` block and
its argument parsing run as on the command line). Running several in one process shares the
start-up that would otherwise dominate a smoke run: importing JAX, transformers and PyTorch
costs 5-8 s per process on 2 cores, a script's tiny run 1-5 s.

  python tests/smoke_runs.py '[["benchmarks/forward.py", "--smoke"], ...]'
  python tests/smoke_runs.py --parse-only '[["benchmarks/train_step.py", "--shapes", "mha_t256"], ...]'

Each script's output is framed by ``@@smoke {json}`` lines (script, status, seconds, traceback).
``--parse-only`` stops each script right after its ``ArgumentParser.parse_args`` succeeds (and
reports the parser's error otherwise), which checks documented arguments without running anything.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import resource
import runpy
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
MARK = "@@smoke "

# XLA:CPU flags for the smoke runs, on top of helpers.command_env's -O0 code generation: XLA's
# fusion emitters off and one code-generation thread. A smoke run's programs are many and tiny and
# their numbers are not checked, so compile time is all that matters: the LoRA train step of a
# 1-layer d=32 decoder compiled in 2.0 s with command_env's flags, 0.25 s with these (2 busy cores).
SMOKE_XLA_FLAGS = ("--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1")


def smoke_env(*, torch: bool = False, devices: int | None = None) -> dict:
  """``helpers.command_env`` plus the fast-compile flags above; ``torch``: PyTorch importable
  (the benchmarks' PyTorch/PEFT peers), which ``command_env`` turns off with ``USE_TORCH=0``."""
  from helpers import command_env

  env = command_env(devices)
  env["XLA_FLAGS"] = " ".join([*env["XLA_FLAGS"].split(), *SMOKE_XLA_FLAGS])
  if torch:
    env.pop("USE_TORCH", None)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
  env["MPLBACKEND"] = "Agg"
  return env


@dataclass
class ScriptRun:
  """One script's part of a grouped run."""
  script: str
  args: list
  status: str  # "ok", "parsed" (--parse-only), "exit N", "error"
  seconds: float
  cpu_seconds: float  # user + system, with the subprocesses it ran
  stdout: str
  error: str  # the traceback, or the argument parser's message


@dataclass
class GroupRun:
  returncode: int
  seconds: float
  cpu_seconds: float  # user + system time of the process and its children
  stdout: str
  stderr: str
  steps: list  # a ScriptRun per step that finished, in order
  out: object = None  # where the test put the scripts' outputs

  @property
  def runs(self) -> dict:
    """script -> its ScriptRun (a script given twice: the last)."""
    return {r.script: r for r in self.steps}

  def __getitem__(self, script: str) -> ScriptRun:
    assert script in self.runs, (f"{script} did not run; the group's output:\n{self.stdout[-3000:]}\n"
                                 f"{self.stderr[-3000:]}")
    return self.runs[script]

  def summary(self) -> str:
    return (f"{self.seconds:.1f} s wall, {self.cpu_seconds:.1f} s CPU: "
            + ", ".join(f"{r.script} {r.seconds:.1f} s ({r.cpu_seconds:.1f} s CPU)" for r in self.steps))

  def ok(self, script: str) -> ScriptRun:
    """The script's run, asserted to have finished without an error."""
    run = self[script]
    assert run.status == "ok", (f"python {script} {' '.join(run.args)}: {run.status}\n{run.error}\n--- its output:\n"
                                f"{run.stdout[-4000:]}\n--- stderr of the group:\n{self.stderr[-4000:]}")
    return run


def run_group(steps, *, env: dict, parse_only: bool = False, timeout: float = 600) -> GroupRun:
  """``steps``: ``[[script, *args], ...]`` (paths relative to the repository) in one subprocess."""
  cmd = [sys.executable, os.path.abspath(__file__), *(["--parse-only"] if parse_only else []), json.dumps(steps)]
  t0, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
  seconds, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
  steps, current, lines = [], None, []
  for line in res.stdout.splitlines():
    if line.startswith(MARK):
      info = json.loads(line[len(MARK):])
      if info["event"] == "begin":
        current, lines = info, []
      else:
        steps.append(ScriptRun(info["script"], info["args"], info["status"], info["seconds"], info["cpu_seconds"],
                               "\n".join(lines), info["error"]))
        current = None
    elif current is not None:
      lines.append(line)
  return GroupRun(res.returncode, seconds, cpu, res.stdout, res.stderr, steps)


# -- checking what a benchmark or example wrote ------------------------------------------------------------

HAVE_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "peft"))
HAVE_QWIX = importlib.util.find_spec("qwix") is not None


def results_snapshot() -> dict:
  """name -> bytes of benchmarks/results/*: a smoke run must leave them as they are."""
  out = {}
  for name in sorted(os.listdir(RESULTS)):
    with open(os.path.join(RESULTS, name), "rb") as f:
      out[name] = f.read()
  return out


def printed_json(stdout: str) -> dict:
  """The result ``_common.write_result`` printed (an indented JSON object)."""
  lines = stdout.splitlines()
  start = max(i for i, l in enumerate(lines) if l == "{")
  end = next(i for i in range(start, len(lines)) if lines[i] == "}")
  return json.loads("\n".join(lines[start:end + 1]))


def finite(x, *, positive: bool = True) -> float:
  assert isinstance(x, (int, float)) and math.isfinite(x) and (x > 0 or not positive), x
  return x


def load_result(path) -> dict:
  """A result file a --smoke run wrote (marked as such)."""
  with open(path) as f:
    result = json.load(f)
  assert result["smoke"] is True and result["machine"]["cpu_count"] >= 1, result.get("machine")
  return result


# -- the grouped runner (this file as a script) ------------------------------------------------------------


class _Parsed(Exception):
  pass


@contextlib.contextmanager
def _stop_after_parsing():
  """``ArgumentParser.parse_args`` parses, then raises ``_Parsed`` instead of returning."""
  original = argparse.ArgumentParser.parse_args

  def parse_args(self, args=None, namespace=None):
    ns = original(self, args, namespace)
    raise _Parsed(ns)

  argparse.ArgumentParser.parse_args = parse_args
  try:
    yield
  finally:
    argparse.ArgumentParser.parse_args = original


def _run_one(script: str, args: list, parse_only: bool) -> tuple[str, str]:
  path = os.path.join(REPO, script)
  saved_argv, saved_path = sys.argv, list(sys.path)
  sys.argv = [path, *args]
  sys.path.insert(0, os.path.dirname(path))
  err = io.StringIO()
  try:
    with contextlib.ExitStack() as stack:
      if parse_only:
        stack.enter_context(_stop_after_parsing())
        stack.enter_context(contextlib.redirect_stderr(err))
      runpy.run_path(path, run_name="__main__")
    return ("ok", "") if not parse_only else ("error", "ran to the end without parsing any arguments")
  except _Parsed:
    return "parsed", ""
  except SystemExit as e:
    if e.code in (None, 0):
      return ("ok", "") if not parse_only else ("exit 0", err.getvalue())
    return f"exit {e.code}", err.getvalue() or traceback.format_exc()
  except BaseException:  # noqa: BLE001 - reported, and the next script runs
    return "error", traceback.format_exc()
  finally:
    sys.argv, sys.path[:] = saved_argv, saved_path


def _cpu() -> float:
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> int:
  parse_only = sys.argv[1] == "--parse-only"
  steps = json.loads(sys.argv[-1])
  failed = 0
  for script, *args in steps:
    print(MARK + json.dumps({"event": "begin", "script": script, "args": args}), flush=True)
    t0, cpu0 = time.perf_counter(), _cpu()
    status, error = _run_one(script, args, parse_only)
    sys.stdout.flush()
    sys.stderr.flush()
    failed += status not in ("ok", "parsed")
    print("\n" + MARK + json.dumps({"event": "end", "script": script, "args": args, "status": status,
                                    "seconds": round(time.perf_counter() - t0, 2),
                                    "cpu_seconds": round(_cpu() - cpu0, 2), "error": error}), flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
