"""jlora's import structure: layers from the ground up, no circles, no import up a layer.

``LAYERS`` is the layer table of docs/architecture.md, lowest first: a module may
import the modules of its own layer and of the layers before it, never one of a
later layer, and no set of modules may import each other in a circle. Imports
are read with ``ast``, module-level and function-level alike (a function-level
import is a dependency too; it only runs later); imports under
``if TYPE_CHECKING:`` are annotations and do not count.

A function-level import of jlora's own modules is allowed only where it defers
an optional heavy dependency (transformers, torch, matplotlib) or keeps a
command's ``--help`` fast, and then it says so in a comment with the word
"deferred" on its line or the line above, e.g.::

    # deferred: reads the model with transformers (optional, slow to import)
    from jlora.finetune import hf_flax
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first. A module belongs to the most specific entry naming it or a package above it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundations", ("jlora._tree", "jlora._errors")),
    ("configuration", ("jlora._variant", "jlora._init_methods", "jlora._config")),
    ("weights and lazy kernels", ("jlora._lazy", "jlora._weight")),
    ("target selection", ("jlora._targets",)),
    ("apply path: values and contract", ("jlora._apply.primitives", "jlora._apply.lowrank", "jlora._apply.recompute",
                                         "jlora._apply.rows", "jlora._apply.context")),
    ("apply path: consumers", ("jlora._apply.consumers",)),
    ("apply path: rules", ("jlora._apply.equations", "jlora._apply.rules", "jlora._apply.base_result",
                           "jlora._apply.rules_structural", "jlora._apply.rules_consumers",
                           "jlora._apply.rules_control")),
    ("apply path: evaluator", ("jlora._apply.evaluator", "jlora._apply.wrap", "jlora._apply")),
    ("tree operations", ("jlora._init", "jlora._partition", "jlora._grad", "jlora._loraplus", "jlora._optim", "jlora._merge",
                         "jlora._count", "jlora._checkpoint", "jlora.sharding")),
    ("kernel formats and adapter families", ("jlora.quant", "jlora.variants", "jlora.hf")),
    ("PEFT format", ("jlora.peft",)),
    ("many adapters and native models", ("jlora.multi", "jlora.models")),
    ("memory report", ("jlora.memory",)),
    ("training data", ("jlora.data",)),
    ("post-training objectives", ("jlora.objectives",)),
    ("public API", ("jlora",)),
    ("fine-tuning command: command line and options", ("jlora.finetune.cli", "jlora.finetune.options",
                                                       "jlora.finetune.numerics", "jlora.finetune.metrics",
                                                       "jlora.finetune.rewards")),
    ("fine-tuning command: configuration", ("jlora.finetune.config",)),
    ("fine-tuning command: parts of a run", ("jlora.finetune.rundir", "jlora.finetune.adapters", "jlora.finetune.checkpoint",
                                             "jlora.finetune.loaded", "jlora.finetune.hf_flax",
                                             "jlora.finetune.model", "jlora.finetune.distributed",
                                             "jlora.finetune.quantize", "jlora.finetune.policy",
                                             "jlora.finetune.memory_check", "jlora.finetune.step")),
    ("fine-tuning command: tasks", ("jlora.finetune.tasks",)),
    ("fine-tuning command: stages", ("jlora.finetune.setup", "jlora.finetune.loop", "jlora.finetune.finish")),
    ("fine-tuning command: the run", ("jlora.finetune.train", "jlora.finetune", "jlora.finetune.__main__")),
    ("generation command", ("jlora.generate",)),
)

_REASON = re.compile(r"#.*\bdeferred\b")


@dataclasses.dataclass(frozen=True)
class Import:
  importer: str
  target: str
  path: str
  line: int
  function_level: bool
  says_why: bool

  def __str__(self) -> str:
    return f"{os.path.relpath(self.path, ROOT)}:{self.line}: {self.importer} -> {self.target}"


def _modules() -> dict[str, str]:
  """``{module name: file}`` of every module in the jlora package."""
  out = {}
  for dirpath, _, files in os.walk(os.path.join(ROOT, "jlora")):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
  return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
  """The module ``name`` refers to (an attribute of a module resolves to the module)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _type_checking_only(tree: ast.AST) -> set[int]:
  """ids of the nodes under ``if TYPE_CHECKING:`` (annotations only)."""
  skip = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
      skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
  return skip


def _imports_of(module: str, path: str) -> list[Import]:
  source = open(path, encoding="utf-8").read()
  lines = source.splitlines()
  tree = ast.parse(source)
  skip = _type_checking_only(tree)
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  out = []

  def says_why(line: int) -> bool:
    return bool(_REASON.search(lines[line - 1]) or (line > 1 and lines[line - 2].lstrip().startswith("#")
                                                    and _REASON.search(lines[line - 2])))

  def visit(node: ast.AST, in_function: bool) -> None:
    for child in ast.iter_child_nodes(node):
      if id(child) in skip:
        continue
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      targets = []
      if isinstance(child, ast.Import):
        targets = [_resolve(a.name) for a in child.names if a.name.split(".")[0] == "jlora"]
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          parts = package.split(".")
          base = ".".join(parts[: len(parts) - child.level + 1] + ([base] if base else []))
        if base.split(".")[0] == "jlora":
          targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else _resolve(base) for a in child.names]
      for target in dict.fromkeys(t for t in targets if t and t != module):
        out.append(Import(module, target, path, child.lineno, in_function, says_why(child.lineno)))
      visit(child, inner)

  visit(tree, False)
  return out


IMPORTS = [imp for m, p in sorted(MODULES.items()) for imp in _imports_of(m, p)]


def layer_of(module: str) -> int | None:
  """Index in ``LAYERS`` of the most specific entry naming ``module`` or a package above it."""
  best, best_len = None, -1
  for i, (_, names) in enumerate(LAYERS):
    for n in names:
      if (module == n or module.startswith(n + ".")) and len(n) > best_len:
        best, best_len = i, len(n)
  return best


def test_every_module_has_a_layer_and_every_layer_entry_exists():
  assert [m for m in MODULES if layer_of(m) is None] == []
  assert [n for _, names in LAYERS for n in names if n not in MODULES] == []


def test_no_import_from_a_lower_layer_up_to_a_higher_one():
  upward = [f"{imp}  ({LAYERS[layer_of(imp.importer)][0]} -> {LAYERS[layer_of(imp.target)][0]})"
            for imp in IMPORTS if layer_of(imp.target) > layer_of(imp.importer)]
  assert upward == [], "imports up a layer (move the definition down, or give the lower layer a registry " \
                       "the higher one fills):\n" + "\n".join(upward)


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

  def connect(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      connect(v)
  return out


def test_no_import_circles():
  edges: dict[str, set[str]] = {m: set() for m in MODULES}
  for imp in IMPORTS:
    edges[imp.importer].add(imp.target)
  circles = _circles(edges)
  assert circles == [], "import circles:\n" + "\n".join(", ".join(c) for c in circles)


def test_function_level_imports_of_jlora_say_why_they_are_deferred():
  silent = [str(imp) for imp in IMPORTS if imp.function_level and not imp.says_why]
  assert silent == [], ("function-level imports of jlora's own modules without a '# deferred: <why>' comment "
                        "(import at module level unless it defers an optional heavy dependency):\n"
                        + "\n".join(silent))


def test_the_checks_catch_what_they_are_for(tmp_path):
  """The analysis sees function-level and TYPE_CHECKING imports for what they are."""
  path = tmp_path / "m.py"
  path.write_text("from typing import TYPE_CHECKING\n"
                  "from jlora._weight import LoraWeight\n"
                  "if TYPE_CHECKING:\n  from jlora.multi import Bank\n"
                  "def f():\n  from jlora import _config\n"
                  "def g():\n  # deferred: a heavy optional dependency\n  from jlora.models import load\n")
  got = {(i.target, i.function_level, i.says_why) for i in _imports_of("jlora._tree", str(path))}
  assert got == {("jlora._weight", False, False), ("jlora._config", True, False), ("jlora.models", True, True)}
  assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert layer_of("jlora._apply.consumers.plans") < layer_of("jlora._apply.evaluator") < layer_of("jlora.quant._api")


def _doc_name(module: str) -> str:
  """How docs/architecture.md names a module: its file (``_tree.py``) or package (``quant/``) in jlora/."""
  path = os.path.relpath(MODULES[module], os.path.join(ROOT, "jlora"))
  return "__init__.py" if module == "jlora" else (os.path.dirname(path) + "/" if path.endswith("__init__.py") else path)


@pytest.mark.parametrize("layer", [name for name, _ in LAYERS])
def test_docs_architecture_names_every_module_of_the_layer_table(layer):
  doc = open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8").read()
  missing = [_doc_name(n) for n in dict(LAYERS)[layer] if f"`{_doc_name(n)}`" not in doc]
  assert missing == [], f"docs/architecture.md does not name {missing} (layer {layer!r} of LAYERS)"
