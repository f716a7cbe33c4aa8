"""The rule table: what the evaluator runs for an equation that reads a LoRA kernel.

A *rule* ``rule(interp, eqn, invals) -> outputs`` replaces ``eqn`` when one of
its inputs is a ``LowRank`` value; ``interp`` is the evaluator (rules of
control flow recurse through it). The rule modules fill ``RULES`` when they are
imported (the evaluator imports them all): ``rules_structural`` (the factors
follow the base), ``rules_consumers`` (matmul, convolution, lookup) and
``rules_control`` (``jit``, ``remat``, ``scan``, ``cond``, ``while``). A rule
raises ``jlora._errors.Unsupported`` for a use the low-rank form cannot serve.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jax.extend.core import primitives as P

from jlora._apply.lowrank import LowRank
from jlora._errors import Unsupported

Rule = Callable[..., list]

RULES: dict[Any, Rule] = {}
# Primitives through which a LoRA kernel stays a kernel (``rules_structural`` adds its own; the
# scalar scaling rule serves mul and div). The recompute analysis reads this set.
STRUCTURAL: set = {P.mul_p, P.div_p}


def rule(*prims):
  """Registers the decorated function as the rule of ``prims``."""
  def deco(fn):
    for p in prims:
      RULES[p] = fn
    return fn

  return deco


def is_lowrank(x) -> bool:
  """True for a LoRA kernel's value in the interpreter."""
  return isinstance(x, LowRank)


def single(invals) -> tuple[LowRank, list]:
  """``(kernel, other operands)`` for an equation whose first operand, and only it, is a LoRA kernel."""
  lrs = [i for i, x in enumerate(invals) if is_lowrank(x)]
  if len(lrs) != 1 or lrs[0] != 0:
    raise Unsupported("")
  return invals[0], invals[1:]
