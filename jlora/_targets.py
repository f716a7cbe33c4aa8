"""Which parameters get adapters: rule matching (``select_targets``), and the ``--targets``
option of the commands as a rule (``expand_targets``)."""

from __future__ import annotations

import dataclasses
import re
import warnings
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


# -- what kind of kernel a path is (mixtures of experts) -------------------------------------------

ROUTED, SHARED, ROUTER, ATTENTION, OTHER = "routed expert", "shared expert", "router", "attention", "other"
_SHARED_MODULES = frozenset({"shared_expert", "shared_experts"})
_ROUTER_MODULES = frozenset({"router", "shared_expert_gate"})


def kernel_kind(path: str, paths: Iterable[str] = ()) -> str:
  """What a kernel path is in a transformer: ``"routed expert"``, ``"shared expert"``, ``"router"``,
  ``"attention"`` or ``"other"``.

  Routed experts sit under an ``experts`` module (jlora.models' ``layers/mlp/experts/gate_proj/kernel``,
  transformers' ``block_sparse_moe/experts/0/w1``), shared experts under ``shared_expert(s)``. Routers are
  ``router`` and ``shared_expert_gate`` modules, and a ``gate`` module beside an ``experts`` module (Mixtral
  and Qwen-MoE name their router ``gate``; ``paths``, the model's other kernel paths, tell). Attention
  kernels sit under a module whose name contains ``attn`` or ``attention``.

  Example:
    >>> from jlora._targets import kernel_kind
    >>> paths = ["layers/mlp/gate/kernel", "layers/mlp/experts/up_proj/kernel"]
    >>> [kernel_kind(p, paths) for p in paths + ["layers/self_attn/q_proj/kernel"]]
    ['router', 'routed expert', 'attention']
  """
  parts = path.split("/")
  modules = parts[:-1]
  if not modules:
    return OTHER
  if modules[-1] in _ROUTER_MODULES:
    return ROUTER
  if modules[-1] == "gate":
    parent = "/".join(modules[:-1])
    prefix = f"{parent}/experts/" if parent else "experts/"
    if any(p.startswith(prefix) for p in paths):
      return ROUTER
  if any(m in _SHARED_MODULES for m in modules):
    return SHARED
  if "experts" in modules:
    return ROUTED
  if any("attn" in m or "attention" in m for m in modules):
    return ATTENTION
  return OTHER


# -- the --targets option of the commands ------------------------------------------------------------


class TargetsNote(UserWarning):
  """A one-line note about a ``--targets`` value, e.g. that it adapts shared experts and no routed one."""

_MODULE_NAMES = re.compile(r"[A-Za-z0-9_]+(,[A-Za-z0-9_]+)*")


def expand_targets(spec: str, layout: Mapping[str, KernelLayout] | Iterable[str], *,
                   model: str = "this model") -> str:
  """A ``--targets`` value as a regex over the parameter paths of a model (``LoraConfig.targets``).

  * ``"all-linear"``: every linear kernel, as PEFT's ``all-linear``: each path
    ending in ``/kernel`` that is neither an embedding table nor under an
    ``lm_head`` module, escaped and joined with ``|``. In a mixture of experts it
    adapts attention, the routed experts and the shared experts, never a router
    (``router``, ``shared_expert_gate``, a ``gate`` beside ``experts``; see
    ``kernel_kind``): a router is adapted only when named;
  * comma-separated module names (``"q_proj,v_proj"``): those modules' kernels,
    ``.*/(q_proj|v_proj)/kernel``, and, escaped, the paths of named modules that
    this pattern cannot reach (a top-level ``lm_head/kernel``, an embedding table
    such as ``embed_tokens/embedding``). ``experts`` names every routed expert kernel
    and ``shared_expert`` every shared one;
  * anything else is a regex on the ``/``-joined paths and comes back unchanged.

  A value that names routed experts (the module ``experts``, or a regex containing
  ``experts``) but reaches none is an error. A value that reaches shared experts and
  no routed expert is allowed, with a ``TargetsNote`` warning of one line naming them
  (``expand_targets_with_notes`` returns the notes instead, for a command to print).

  Args:
    spec: the value given, e.g. ``"all-linear"``.
    layout: ``{path: jlora.KernelLayout}`` of the model's kernels (from
      ``jlora.infer_layout`` or ``jlora.models.Decoder.layout``), or their paths.
    model: how error messages name the model (``"this llama model"``).

  Returns:
    A regex for ``re.fullmatch`` on parameter paths.

  Raises:
    ValueError: ``all-linear`` on a model without linear kernels, a module
      name that holds no kernel (the message lists the model's modules), or a
      value that names routed experts and reaches none.

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
  regex, notes = expand_targets_with_notes(spec, layout, model=model)
  for note in notes:
    warnings.warn(note, TargetsNote, stacklevel=2)
  return regex


def expand_targets_with_notes(spec: str, layout: Mapping[str, KernelLayout] | Iterable[str], *,
                              model: str = "this model") -> tuple[str, list[str]]:
  """``expand_targets`` without warnings: ``(regex, notes)``, each note one line for a command to print.

  Example:
    >>> from jlora._targets import expand_targets_with_notes
    >>> paths = ["layers/mlp/experts/up_proj/kernel", "layers/mlp/shared_expert/up_proj/kernel",
    ...          "layers/mlp/router/kernel"]
    >>> expand_targets_with_notes("all-linear", paths)[0]
    'layers/mlp/experts/up_proj/kernel|layers/mlp/shared_expert/up_proj/kernel'
    >>> expand_targets_with_notes(".*/shared_expert/.*", paths)[1]  # doctest: +ELLIPSIS
    ["targets '.*/shared_expert/.*' adapt shared experts only (1 kernel: layers/mlp/shared_expert/up_proj/kernel), ..."]
  """
  entries = list(layout.items()) if isinstance(layout, Mapping) else [(p, None) for p in layout]
  all_paths = [p for p, _ in entries]
  kinds = {p: kernel_kind(p, all_paths) for p in all_paths}
  routed_named = False
  if spec == "all-linear":
    paths = [p for p, lay in entries
             if not (lay is not None and lay.embedding) and "lm_head" not in p.split("/") and p.endswith("/kernel")
             and kinds[p] != ROUTER]
    if not paths:
      raise ValueError(f"targets 'all-linear': {model} has no linear kernels (parameters ending in '/kernel' "
                       "outside lm_head)")
    regex = "|".join(re.escape(p) for p in paths)
  elif not _MODULE_NAMES.fullmatch(spec):
    regex = spec
    routed_named = re.search(r"(?<!shared_)experts", spec) is not None
  else:
    regex, routed_named = _module_names(spec, entries, kinds, model)
  notes = []
  matched = [p for p in all_paths if re.fullmatch(regex, p)]
  routed = [p for p in matched if kinds[p] == ROUTED]
  shared = [p for p in matched if kinds[p] == SHARED]
  if routed_named and not routed:
    have = [p for p in all_paths if kinds[p] == ROUTED]
    raise ValueError(
        f"targets {spec!r} name routed experts but reach none of {model}'s "
        + (f"routed expert kernels ({_examples(have, 3)})" if have else "kernels: it has no routed experts")
        + "; fix the name or regex (the module 'experts' names them all).")
  if shared and not routed:
    notes.append(f"targets {spec!r} adapt shared experts only ({len(shared)} kernel{'s' if len(shared) > 1 else ''}: "
                 f"{', '.join(shared[:4])}{' ...' if len(shared) > 4 else ''}), no routed expert; name the routed "
                 "experts too ('experts' or 'all-linear') if you meant them.")
  return regex, notes


def _module_names(spec: str, entries: list, kinds: dict, model: str) -> tuple[str, bool]:
  names = spec.split(",")
  modules: dict[str, list[str]] = {}  # module name -> its kernel and embedding paths
  for path, _ in entries:
    parts = path.split("/")
    if len(parts) >= 2 and parts[-1] in ("kernel", "embedding"):
      modules.setdefault(parts[-2], []).append(path)
  groups = {"experts": [p for p, k in kinds.items() if k == ROUTED and p.endswith("/kernel")],
            "shared_expert": [p for p, k in kinds.items() if k == SHARED and p.endswith("/kernel")]}
  bad = [n for n in names if n not in modules and n not in groups]
  if bad:
    raise ValueError(f"targets {spec!r}: {bad} are not modules of {model}; known: {', '.join(sorted(modules))} "
                     "(or 'all-linear', or a regex over parameter paths).")
  plain = [n for n in names if n not in groups]
  nested = [n for n in plain if any(p.count("/") >= 2 and p.endswith("/kernel") for p in modules[n])]
  others = [p for n in plain for p in modules[n] if not (p.count("/") >= 2 and p.endswith("/kernel"))]
  grouped = [p for n in names if n in groups for p in groups[n]]
  parts = ([rf".*/({'|'.join(nested)})/kernel"] if nested else []) + [
      re.escape(p) for p in dict.fromkeys(others + grouped)]
  return "|".join(parts) or "(?!)", "experts" in names
