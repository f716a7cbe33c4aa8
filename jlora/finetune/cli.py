"""What a command-line user meets: the user-error family and one-line error reporting.

A *user error* is a problem with what the user gave a command (a flag, a file, a
directory), which the user fixes; a *bug* is everything else. The commands
(``jlora-finetune``, ``jlora-generate``) print a user error as one line on
stderr (what, where, the fix) and exit with status 2; a bug keeps its traceback.

Which exceptions are user errors is an explicit list, never ``except Exception``:

* ``UserError`` and its subclasses (``OptionError``), raised where user input is checked,
  and ``jlora.data.DataError`` (bad data: the message names the file and line);
* the library's own errors about what it was given to load:
  ``jlora.AdapterMismatchError`` (an adapter or checkpoint on the wrong base)
  and ``jlora.peft.PeftFormatError`` (a PEFT directory jlora cannot load).

A library ``ValueError`` becomes a user error only where the command converts
it, at the line that hands user input to the library (e.g. ``--targets`` to
``jlora.init``).
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence

from jlora._checkpoint import AdapterMismatchError
from jlora.data import DataError
from jlora.peft import PeftFormatError

EXIT_USER_ERROR = 2  # the status argparse uses for usage errors


class UserError(ValueError):
  """Something the user gave the command is wrong; the message says what, where and the fix.

  Example:
    >>> from jlora.finetune.cli import UserError, report
    >>> print(report("jlora-finetune", UserError("--data x.jsonl: no such file")))
    jlora-finetune: error: --data x.jsonl: no such file
  """


class OptionError(UserError):
  """An option has an invalid value; ``option`` is the config field name, ``problem`` the rest.

  The message reads ``TrainConfig.<option> <problem>``; the command line
  rewrites the location as the flag or config-file key the value came from.

  Example:
    >>> from jlora.finetune.cli import OptionError
    >>> str(OptionError("rank", "must be > 0, got 0"))
    'TrainConfig.rank must be > 0, got 0.'
  """

  def __init__(self, option: str, problem: str, *, owner: str = "TrainConfig"):
    self.option = option
    self.problem = problem
    super().__init__(f"{owner}.{option} {problem}.")


def user_error_types() -> tuple[type[BaseException], ...]:
  """The exception types the commands report as one line (see the module docstring).

  Example:
    >>> from jlora.finetune.cli import UserError, user_error_types
    >>> UserError in user_error_types()
    True
  """
  return (UserError, DataError, AdapterMismatchError, PeftFormatError)


def one_line(text: str) -> str:
  """``text`` with every run of whitespace (newlines included) collapsed to one space.

  Example:
    >>> from jlora.finetune.cli import one_line
    >>> one_line("bad\\n  line ")
    'bad line'
  """
  return " ".join(str(text).split())


def report(prog: str, error: BaseException) -> str:
  """The one line printed for a user error.

  Example:
    >>> from jlora.finetune.cli import report
    >>> report("jlora-generate", ValueError("no\\nnewlines"))
    'jlora-generate: error: no newlines'
  """
  return f"{prog}: error: {one_line(str(error))}"


def suggest(name: str, known: Sequence[str], aliases: Mapping[str, str] | None = None) -> str | None:
  """The known name closest to ``name``: a listed alias first, then the most similar spelling.

  Example:
    >>> from jlora.finetune.cli import suggest
    >>> suggest("learning_rate", ["lr", "rank"], {"learning_rate": "lr"})
    'lr'
    >>> suggest("rnak", ["lr", "rank"])
    'rank'
  """
  key = name.lstrip("-").replace("-", "_").lower()
  if aliases and key in aliases:
    return aliases[key]
  near = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
  return near[0] if near else None


class ArgumentParser(argparse.ArgumentParser):
  """``argparse.ArgumentParser`` whose usage errors are one line (no usage block), exit 2.

  An unknown flag is answered with the closest known one: ``suggest_flag(flag)``
  if given (e.g. for aliases), else the most similar spelling.

  Example:
    >>> from jlora.finetune.cli import ArgumentParser
    >>> p = ArgumentParser(prog="demo")
    >>> _ = p.add_argument("--rank", type=int)
    >>> p.parse_args(["--rank", "4"]).rank
    4
  """

  def __init__(self, *args, suggest_flag: Callable[[str], str | None] | None = None, **kwargs):
    kwargs.setdefault("allow_abbrev", False)  # "--ra 4" must not silently mean --rank
    super().__init__(*args, **kwargs)
    self._suggest_flag = suggest_flag

  def parse_args(self, args=None, namespace=None):
    ns, extra = self.parse_known_args(args, namespace)
    if extra:
      flag = next((a for a in extra if a.startswith("-")), None)
      if flag is None:
        self.error(f"unexpected argument {extra[0]!r}; every option is a --flag")
      name = flag.split("=", 1)[0]
      flags = [f for f in self._option_string_actions if f.startswith("--") and not f.startswith("--no-")]
      near = self._suggest_flag(name) if self._suggest_flag else None
      if near is None:  # the most similar spelling, if it is close (a wrong hint is worse than none)
        names = difflib.get_close_matches(name.lstrip("-").replace("_", "-"), [f[2:] for f in flags], n=1,
                                          cutoff=0.75)
        near = f"--{names[0]}" if names else None
      self.error(f"unknown option {name}" + (f"; did you mean {near}?" if near else ""))
    return ns

  def error(self, message: str):
    hint = "" if "--help" in message else " (see --help)"
    sys.stderr.write(f"{self.prog}: error: {one_line(message)}{hint}\n")
    sys.exit(EXIT_USER_ERROR)


def _show_warning(prog: str, original):
  """Prints jlora's own warnings as one ``prog: warning: ...`` line; others unchanged."""
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def show(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, UserWarning) and os.path.abspath(filename).startswith(package + os.sep):
      print(f"{prog}: warning: {one_line(str(message))}", file=sys.stderr if file is None else file)
      return
    original(message, category, filename, lineno, file, line)

  return show


def quiet_abandoned_reads() -> None:
  """Silences the noise Orbax/TensorStore leave behind when a read of a damaged file fails.

  A failed restore (a truncated array file) abandons its other reads: their
  completion callbacks hit a closed asyncio loop (printed as "Exception
  ignored" tracebacks) and their tasks and futures die unobserved (logged by
  asyncio as "Task exception was never retrieved" or "Future exception was
  never retrieved", with a traceback). Nothing is wrong by
  then, and the noise would bury the one line that says what is. Only those
  two kinds of message are dropped; installed once per process.

  Example:
    >>> from jlora.finetune.cli import quiet_abandoned_reads
    >>> quiet_abandoned_reads()
  """
  import logging

  previous = sys.unraisablehook
  if getattr(previous, "_jlora_quiet", False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
      return
    if _is_failed_array_read(e):  # a sibling read's coroutine, closed with the failed restore
      return
    previous(unraisable)

  hook._jlora_quiet = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_AbandonedTensorStoreRead())


def _is_failed_array_read(e: BaseException | None) -> bool:
  """A TensorStore read of a damaged file, as Orbax reports it: a ValueError naming the store, or
  the bare Exception Orbax 0.12 wraps it in ("Encountered error while reading array index ...")."""
  return ((isinstance(e, ValueError) and "tensorstore_spec" in str(e))
          or (type(e) is Exception and str(e).startswith("Encountered error while reading array index")))


class _AbandonedTensorStoreRead:
  """A logging filter: drops asyncio's "never retrieved" reports of failed TensorStore reads."""

  def filter(self, record) -> bool:
    e = record.exc_info[1] if record.exc_info else None
    return not (str(record.msg).startswith(("Task exception was never retrieved",
                                            "Future exception was never retrieved"))
                and _is_failed_array_read(e))


def run_command(prog: str, body: Callable[[], int]) -> int:
  """Runs a command's ``body``; a user error becomes one stderr line and exit status 2.

  Anything that is not a user error (see ``user_error_types``) propagates with
  its traceback.

  Example:
    >>> from jlora.finetune.cli import UserError, run_command
    >>> def body():
    ...   raise UserError("--rank 0: must be > 0")
    >>> run_command("demo", body)  # prints "demo: error: --rank 0: must be > 0" to stderr
    2
  """
  old = warnings.showwarning
  warnings.showwarning = _show_warning(prog, old)
  quiet_abandoned_reads()
  try:
    return body()
  except user_error_types() as e:
    sys.stdout.flush()
    print(report(prog, e), file=sys.stderr, flush=True)
    return EXIT_USER_ERROR
  finally:
    warnings.showwarning = old
