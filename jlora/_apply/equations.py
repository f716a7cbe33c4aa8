"""Re-running one jaxpr equation: bind its primitive, under its source context, and name its source line."""

from __future__ import annotations

import contextlib

try:  # source locations in error messages and profiles; private, so optional
  from jax._src import source_info_util as _siu
except Exception:  # pragma: no cover
  _siu = None


def where(eqn) -> str:
  """Where the equation comes from, as ``" (at file:line)"`` for error messages (``""`` if unknown)."""
  if _siu is None:
    return ""
  try:
    s = _siu.summarize(eqn.source_info)
    return f" (at {s})" if s and "unknown" not in s else ""
  except Exception:  # pragma: no cover
    return ""


def source_context(eqn):
  """A context manager that attributes the operations bound inside it to ``eqn``'s source."""
  if _siu is None:
    return contextlib.nullcontext()
  stack = contextlib.ExitStack()
  try:
    name_stack = _siu.current_name_stack() + eqn.source_info.name_stack
    stack.enter_context(_siu.user_context(eqn.source_info.traceback, name_stack=name_stack))
  except Exception:  # pragma: no cover
    pass
  stack.enter_context(eqn.ctx.manager)
  return stack


def bind(eqn, invals, *, with_source: bool = True) -> list:
  """The equation's primitive applied to ``invals``, as a list of outputs."""
  params = eqn.primitive.get_bind_params(eqn.params)
  with source_context(eqn) if with_source else contextlib.nullcontext():
    out = eqn.primitive.bind(*invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]
