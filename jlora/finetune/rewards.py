"""Reward functions of ``--task grpo`` (``--reward``): the built-in ones and users' own, called and checked.

A reward function has TRL's signature: ``f(prompts, completions, completion_ids, **fields)``
returns one number per completion. ``prompts`` and ``completions`` are strings (a
conversational prompt: its messages as dicts), ``completion_ids`` each completion's token ids,
and ``fields`` every other field of the records, one list entry per completion (a record's
``G`` completions see its fields ``G`` times). ``--reward NAME[:WEIGHT]`` names one;
``rewards_for`` loads them, ``score`` calls them and refuses a result that is not one finite
number per completion, naming the reward.

Built in (``NAME[:WEIGHT]``; the weight, a number, is always the last ``:`` field):

=================  ==============================================================================
``exact_match``    1 if the completion, stripped, equals the record's ``answer`` (else ``completion``)
                   field, stripped; else 0
``contains``       1 if the completion holds that field's text, stripped; else 0
``regex:PATTERN``  1 if ``re.search(PATTERN, completion, re.DOTALL)`` finds it (a format reward)
``length:BUDGET``  0 up to ``BUDGET`` tokens, then linearly down to -1 at ``--max-completion-length``
                   tokens (an overlong penalty, DAPO's soft one)
=================  ==============================================================================

Users' own: ``module:function`` (imported; the working directory is on the path of
``python -m jlora.finetune``) or ``path/to/file.py:function``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jlora.finetune.cli import UserError

BUILTIN = ("exact_match", "contains", "regex", "length")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_MODULE = re.compile(r"[A-Za-z_][\w.]*|.+\.py")
_FUNCTION = re.compile(r"[A-Za-z_]\w*")


class RewardSpecError(ValueError):
  """A ``--reward`` value that does not parse (the message says what the syntax is)."""


class RewardError(UserError):
  """A reward function that cannot be loaded, raised, or returned something else than one number per completion."""


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  """One parsed ``--reward`` value.

  Example:
    >>> from jlora.finetune.rewards import parse_reward
    >>> parse_reward("regex:^<answer>.*</answer>$:0.5")
    RewardSpec(text='regex:^<answer>.*</answer>$:0.5', kind='regex', arg='^<answer>.*</answer>$', weight=0.5)
  """

  text: str  # as given
  kind: str  # one of BUILTIN, or "function" (a user's module:function)
  arg: str  # regex: the pattern; length: the budget; function: "module:function"; else ""
  weight: float


def parse_reward(text: str) -> RewardSpec:
  """A ``--reward`` value, parsed (its syntax only: nothing is imported).

  Raises:
    RewardSpecError: the value does not parse, saying what was expected.

  Example:
    >>> from jlora.finetune.rewards import parse_reward
    >>> parse_reward("exact_match:2").weight, parse_reward("length:64").arg, parse_reward("my_rewards:fmt").kind
    (2.0, '64', 'function')
  """
  parts = text.split(":")
  weight = 1.0
  head = parts[0]
  if len(parts) > 1 and _NUMBER.fullmatch(parts[-1]) and not (head == "length" and len(parts) == 2):
    weight = float(parts[-1])
    parts = parts[:-1]
  if not math.isfinite(weight):
    raise RewardSpecError(f"{text!r}: the weight must be a finite number")
  rest = ":".join(parts[1:])
  if head in ("exact_match", "contains"):
    if rest:
      raise RewardSpecError(f"{text!r}: {head} takes no argument; write {head} or {head}:WEIGHT")
    return RewardSpec(text, head, "", weight)
  if head == "regex":
    if not rest:
      raise RewardSpecError(f"{text!r}: write regex:PATTERN (or regex:PATTERN:WEIGHT)")
    try:
      re.compile(rest)
    except re.error as e:
      raise RewardSpecError(f"{text!r}: {rest!r} is not a valid regex ({e})") from None
    return RewardSpec(text, head, rest, weight)
  if head == "length":
    if not rest.isdigit() or int(rest) < 1:
      raise RewardSpecError(f"{text!r}: write length:BUDGET (or length:BUDGET:WEIGHT), BUDGET a number of tokens "
                            f">= 1")
    return RewardSpec(text, head, rest, weight)
  if len(parts) == 2 and _MODULE.fullmatch(head) and _FUNCTION.fullmatch(parts[1]):
    return RewardSpec(text, "function", f"{head}:{parts[1]}", weight)
  raise RewardSpecError(f"{text!r}: use {', '.join(b for b in BUILTIN if b not in ('regex', 'length'))}, "
                        "regex:PATTERN, length:BUDGET or your module:function (or file.py:function), each "
                        "optionally followed by :WEIGHT")


def _answer(fields: Mapping[str, Sequence[Any]], i: int, name: str) -> str:
  for key in ("answer", "completion"):
    if key in fields and isinstance(fields[key][i], str):
      return fields[key][i]
  raise RewardError(f"--reward {name} compares with the record's answer or completion field (a string), which "
                    f"record {i} of the batch lacks; add it to the data, or use another reward")


def exact_match(prompts, completions, completion_ids, **fields) -> list[float]:
  """1.0 where the completion, stripped, equals the record's ``answer`` (else ``completion``), stripped."""
  return [float(c.strip() == _answer(fields, i, "exact_match").strip()) for i, c in enumerate(completions)]


def contains(prompts, completions, completion_ids, **fields) -> list[float]:
  """1.0 where the completion holds the record's ``answer`` (else ``completion``), stripped."""
  return [float(_answer(fields, i, "contains").strip() in c) for i, c in enumerate(completions)]


def regex(pattern: str) -> Callable:
  """A format reward: 1.0 where ``re.search(pattern, completion, re.DOTALL)`` finds it."""
  compiled = re.compile(pattern, re.DOTALL)

  def reward(prompts, completions, completion_ids, **fields) -> list[float]:
    return [float(compiled.search(c) is not None) for c in completions]

  return reward


def length(budget: int, max_length: int) -> Callable:
  """An overlong penalty: 0 up to ``budget`` tokens, then linearly down to -1 at ``max_length`` tokens."""
  span = max(max_length - budget, 1)

  def reward(prompts, completions, completion_ids, **fields) -> list[float]:
    return [-min(1.0, max(0, len(ids) - budget) / span) for ids in completion_ids]

  return reward


def _load_function(arg: str, text: str) -> Callable:
  module_name, _, function = arg.rpartition(":")
  try:
    if module_name.endswith(".py"):
      if not os.path.isfile(module_name):
        raise RewardError(f"--reward {text}: no such file {module_name!r}")
      spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(module_name))[0], module_name)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
    else:
      if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
      module = importlib.import_module(module_name)
  except RewardError:
    raise
  except Exception as e:  # noqa: BLE001  (whatever the user's module raises on import is reported, named)
    raise RewardError(f"--reward {text}: importing {module_name} failed: {type(e).__name__}: {e}") from None
  fn = getattr(module, function, None)
  if not callable(fn):
    raise RewardError(f"--reward {text}: {module_name} has no function {function!r}")
  return fn


@dataclasses.dataclass(frozen=True)
class Reward:
  """A loaded reward function, its metric name (``rewards/<name>/mean``) and weight."""

  name: str
  fn: Callable
  weight: float
  text: str  # the --reward value


def rewards_for(specs: Sequence[str], *, max_completion_length: int) -> list[Reward]:
  """The reward functions ``--reward`` names, loaded; names made unique (``regex``, ``regex_2``, ...).

  Raises:
    RewardError: a module or function that cannot be loaded, or a length budget not below
      ``max_completion_length``.

  Example:
    >>> from jlora.finetune.rewards import rewards_for
    >>> [(r.name, r.weight) for r in rewards_for(["exact_match", "regex:^ a:0.5", "regex:b$"], max_completion_length=8)]
    [('exact_match', 1.0), ('regex', 0.5), ('regex_2', 1.0)]
  """
  out: list[Reward] = []
  seen: dict[str, int] = {}
  for text in specs:
    spec = parse_reward(text)
    if spec.kind in ("exact_match", "contains"):
      fn, name = {"exact_match": exact_match, "contains": contains}[spec.kind], spec.kind
    elif spec.kind == "regex":
      fn, name = regex(spec.arg), "regex"
    elif spec.kind == "length":
      if int(spec.arg) >= max_completion_length:
        raise RewardError(f"--reward {text}: the budget must be below --max-completion-length "
                          f"({max_completion_length}), where the penalty reaches -1")
      fn, name = length(int(spec.arg), max_completion_length), "length"
    else:
      fn = _load_function(spec.arg, text)
      name = getattr(fn, "__name__", spec.arg.rpartition(":")[2])
    seen[name] = seen.get(name, 0) + 1
    out.append(Reward(name if seen[name] == 1 else f"{name}_{seen[name]}", fn, spec.weight, text))
  return out


def score(rewards: Sequence[Reward], prompts: Sequence[Any], completions: Sequence[str],
          completion_ids: Sequence[Sequence[int]], fields: Mapping[str, Sequence[Any]]) -> list[list[float]]:
  """Each reward function's values, ``[function][completion]``, checked.

  Raises:
    RewardError: a function raised, or returned something else than one finite number per
      completion (a wrong count, None, NaN, a string); the message names the ``--reward``.

  Example:
    >>> from jlora.finetune.rewards import rewards_for, score
    >>> rs = rewards_for(["exact_match", "contains"], max_completion_length=8)
    >>> score(rs, ["Q", "Q"], [" a b", "b"], [[1, 2], [2]], {"answer": ["a b", "a b"]})
    [[1.0, 0.0], [1.0, 0.0]]
  """
  n = len(completions)
  out = []
  for r in rewards:
    try:
      values = r.fn(prompts=list(prompts), completions=list(completions), completion_ids=[list(c) for c in
                                                                                         completion_ids], **fields)
    except RewardError:
      raise
    except Exception as e:  # noqa: BLE001  (a user's function: any failure is reported, naming it)
      raise RewardError(f"--reward {r.text} raised {type(e).__name__}: {e}") from None
    try:
      values = list(values)
    except TypeError:
      raise RewardError(f"--reward {r.text} returned a {type(values).__name__}; it must return a list of {n} numbers, "
                        "one per completion") from None
    if len(values) != n:
      raise RewardError(f"--reward {r.text} returned {len(values)} values for {n} completions; it must return one "
                        "number per completion")
    checked = []
    for i, v in enumerate(values):
      if not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
        raise RewardError(f"--reward {r.text} returned {v!r} for completion {i}; every value must be a number "
                          "(None or a skipped completion is not a reward: return 0.0 if that is meant)")
      v = float(v)
      if not math.isfinite(v):
        raise RewardError(f"--reward {r.text} returned {v} for completion {i}; every value must be finite")
      checked.append(v)
    out.append(checked)
  return out
