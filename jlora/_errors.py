"""The apply path's errors, defined at the bottom because lower layers raise them too.

``Unsupported`` is raised wherever the low-rank form cannot express an operation:
a structural or consumer rule, a variant's consumer, or a lazy kernel asked to
record an operation it cannot defer (``jlora._lazy.LazyBase.record``). The
interpreter catches it and turns it into ``LoraApplyError`` (or, with
``jlora.wrap(fn, on_unsupported="merge")``, into a merge for that one use).
``OrientationError`` is a consumer meeting a kernel in another orientation than
its adapter's; the interpreter reports it with the source line.

Example:
  >>> import jlora
  >>> from jlora._errors import LoraApplyError
  >>> LoraApplyError is jlora.LoraApplyError and issubclass(LoraApplyError, ValueError)
  True
"""

from __future__ import annotations


class LoraApplyError(ValueError):
  """The wrapped function used a LoRA kernel in a way the low-rank path cannot serve."""


class Unsupported(Exception):
  """Raised by a rule when the low-rank form cannot express an operation."""


class OrientationError(Exception):
  """A consumer uses a kernel in another orientation than its adapter was built for."""
