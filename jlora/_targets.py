"""Which parameters get adapters: rule matching (``select_targets``), and the ``--targets``
option of the commands as a rule (``expand_targets``)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from jlora._config import KernelLayout, LoraConfig, Rule
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


# -- the --targets option of the commands ------------------------------------------------------------

_MODULE_NAMES = re.compile(r"[A-Za-z0-9_]+(,[A-Za-z0-9_]+)*")


def expand_targets(spec: str, layout: Mapping[str, KernelLayout] | Iterable[str], *,
                   model: str = "this model") -> str:
  """A ``--targets`` value as a regex over the parameter paths of a model (``LoraConfig.targets``).

  * ``"all-linear"``: every linear kernel, as PEFT's ``all-linear``: each path
    ending in ``/kernel`` that is neither an embedding table nor under an
    ``lm_head`` module, escaped and joined with ``|``;
  * comma-separated module names (``"q_proj,v_proj"``): those modules' kernels,
    ``.*/(q_proj|v_proj)/kernel``, and, escaped, the paths of named modules that
    this pattern cannot reach (a top-level ``lm_head/kernel``, an embedding table
    such as ``embed_tokens/embedding``);
  * anything else is a regex on the ``/``-joined paths and comes back unchanged.

  Args:
    spec: the value given, e.g. ``"all-linear"``.
    layout: ``{path: jlora.KernelLayout}`` of the model's kernels (from
      ``jlora.infer_layout`` or ``jlora.models.Decoder.layout``), or their paths.
    model: how error messages name the model (``"this llama model"``).

  Returns:
    A regex for ``re.fullmatch`` on parameter paths.

  Raises:
    ValueError: ``all-linear`` on a model without linear kernels, or a module
      name that holds no kernel (the message lists the model's modules).

  Example:
    >>> import jlora
    >>> from jlora._targets import expand_targets
    >>> layout = {"embed/embedding": jlora.KernelLayout(in_axes=(0,), embedding=True),
    ...           "layers/attn/q/kernel": jlora.KernelLayout(in_axes=(1,), batch_axes=(0,)),
    ...           "lm_head/kernel": jlora.KernelLayout(in_axes=(0,))}
    >>> expand_targets("all-linear", layout)
    'layers/attn/q/kernel'
    >>> expand_targets("q,lm_head", layout)
    '.*/(q)/kernel|lm_head/kernel'
  """
  entries = list(layout.items()) if isinstance(layout, Mapping) else [(p, None) for p in layout]
  if spec == "all-linear":
    paths = [p for p, lay in entries
             if not (lay is not None and lay.embedding) and "lm_head" not in p.split("/") and p.endswith("/kernel")]
    if not paths:
      raise ValueError(f"targets 'all-linear': {model} has no linear kernels (parameters ending in '/kernel' "
                       "outside lm_head)")
    return "|".join(re.escape(p) for p in paths)
  if not _MODULE_NAMES.fullmatch(spec):
    return spec
  names = spec.split(",")
  modules: dict[str, list[str]] = {}  # module name -> its kernel and embedding paths
  for path, _ in entries:
    parts = path.split("/")
    if len(parts) >= 2 and parts[-1] in ("kernel", "embedding"):
      modules.setdefault(parts[-2], []).append(path)
  bad = [n for n in names if n not in modules]
  if bad:
    raise ValueError(f"targets {spec!r}: {bad} are not modules of {model}; known: {', '.join(sorted(modules))} "
                     "(or 'all-linear', or a regex over parameter paths).")
  nested = [n for n in names if any(p.count("/") >= 2 and p.endswith("/kernel") for p in modules[n])]
  others = [p for n in names for p in modules[n] if not (p.count("/") >= 2 and p.endswith("/kernel"))]
  parts = ([rf".*/({'|'.join(nested)})/kernel"] if nested else []) + [re.escape(p) for p in dict.fromkeys(others)]
  return "|".join(parts)
