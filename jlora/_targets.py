"""Rule matching: which parameters get adapters, with errors for rules that select nothing."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from jlora._config import LoraConfig, Rule
from jlora._tree import close_matches, leaves_with_paths
from jlora._weight import is_lora_weight, is_node


@dataclasses.dataclass(frozen=True)
class Target:
  path: str
  leaf: Any
  rule_index: int
  rule: Rule


def _examples(paths: list[str], n: int = 6) -> str:
  shown = ", ".join(repr(p) for p in paths[:n])
  more = f" (+{len(paths) - n} more)" if len(paths) > n else ""
  return shown + more


def select_targets(params: Any, config: LoraConfig) -> list[Target]:
  """Applies ``config.targets`` / ``config.exclude`` to ``params`` (first rule wins).

  Raises:
    ValueError: a rule matches nothing, only matches excluded paths, or only
      matches paths an earlier rule already claimed; an exclude pattern matches
      nothing; a matched path already holds an adapter.
  """
  rules = config.targets
  entries = list(leaves_with_paths(params, is_leaf=is_node))
  all_paths = [p for p, _ in entries]
  kernel_like = [p for p, leaf in entries if len(getattr(leaf, "shape", ())) >= 2]
  raw_hits = [0] * len(rules)
  won = [0] * len(rules)
  excluded_hits = [0] * len(rules)
  exclude_hits = [0] * len(config.exclude)
  selected: list[Target] = []
  for path, leaf in entries:
    excluded = False
    for j, pat in enumerate(config.exclude):
      if re.fullmatch(pat, path):
        exclude_hits[j] += 1
        excluded = True
    winner = None
    for i, rule in enumerate(rules):
      if re.fullmatch(rule.pattern, path):
        raw_hits[i] += 1
        if winner is None:
          winner = i
    if winner is None:
      continue
    if excluded:
      excluded_hits[winner] += 1
      continue
    if is_lora_weight(leaf):
      raise ValueError(
          f"{path!r} already holds a LoRA adapter (matched by LoraConfig.targets[{winner}]). "
          "jlora.init takes the original params; use jlora.unload(params) or jlora.merge(params) "
          "first, or exclude this path."
      )
    won[winner] += 1
    selected.append(Target(path, leaf, winner, rules[winner]))

  for i, rule in enumerate(rules):
    where = f"LoraConfig.targets[{i}] ({rule.pattern!r})"
    if raw_hits[i] == 0:
      near = close_matches(rule.pattern, kernel_like or all_paths)
      hint = f" Did you mean {near[0]!r}?" if near else ""
      raise ValueError(
          f"{where} matched no parameter path (regex fullmatch on '/'-joined paths).{hint} "
          f"Paths look like: {_examples(kernel_like or all_paths)}."
      )
    if won[i] == 0 and excluded_hits[i] > 0:
      raise ValueError(
          f"{where} only matched paths removed by LoraConfig.exclude (or claimed by an earlier "
          "rule); drop the rule or narrow the exclude."
      )
    if won[i] == 0:
      raise ValueError(
          f"{where} only matched paths already claimed by an earlier rule (rules are tried in "
          "order and the first fullmatch wins): put the more specific rule first."
      )
  for j, pat in enumerate(config.exclude):
    if exclude_hits[j] == 0:
      raise ValueError(
          f"LoraConfig.exclude[{j}] ({pat!r}) matched no parameter path; fix or remove it. "
          f"Paths look like: {_examples(kernel_like or all_paths)}."
      )
  return selected
