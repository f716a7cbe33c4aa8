"""Init methods: the registry behind ``LoraConfig(init=...)``, and the built-in ones.

``LoraConfig`` checks the name it is given here, and ``jlora.init`` calls the
method. The registry sits below both (the configuration layer) so that neither
needs the other; ``"default"`` (PEFT's kaiming-uniform ``A``, ``B = 0``) and
``"gaussian"`` are defined here, and the subpackages register theirs when they
are imported (``jlora.variants``: ``"pissa"``, ``"olora"``, ``"adalora"``;
``jlora.quant``: ``"loftq"``), which ``import jlora`` does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
  from jlora._config import LoraConfig
  from jlora._variant import Variant
  from jlora._weight import LoraSpec

# An init method: (key, spec, w0, config) -> (w0 to keep, {"a": A, "b": B}) in any float dtype.
# Methods that change the base (PiSSA, LoftQ...) return the new w0; the others return w0 as is.
InitFn = Callable[[jax.Array, "LoraSpec", Any, "LoraConfig"], tuple[Any, dict[str, jax.Array]]]
# Wraps the configured variant for an init method that needs children of its own (PiSSA
# keeps its initial factors to export the adapter onto the original base).
VariantWrap = Callable[["Variant"], "Variant"]
# (regex fullmatch on the name, shown name, fn, variant wrap or None)
_INIT_METHODS: list[tuple[str, str, InitFn, VariantWrap | None]] = []


def register_init(pattern: str, fn: InitFn, *, shown: str | None = None, variant: VariantWrap | None = None) -> None:
  """Registers an init method for ``LoraConfig(init=...)`` (names are matched by regex fullmatch).

  ``variant``, if given, maps the configured variant to the one the adapters get
  (e.g. a wrapper that keeps the initial factors as frozen children).

  Example:
    >>> from jlora._init_methods import resolve_init
    >>> resolve_init("gaussian") is not None, resolve_init("nope") is None
    (True, True)
  """
  _INIT_METHODS.append((pattern, shown or pattern, fn, variant))


def _lookup(name: str) -> tuple[str, str, InitFn, VariantWrap | None] | None:
  for entry in _INIT_METHODS:
    if re.fullmatch(entry[0], name):
      return entry
  return None


def resolve_init(name: str) -> InitFn | None:
  """The init method ``LoraConfig(init=name)`` names, or ``None``."""
  entry = _lookup(name)
  return None if entry is None else entry[2]


def variant_for(config: LoraConfig) -> Variant:
  """The variant the adapters of ``config`` get: the configured one, as the init method needs it."""
  entry = _lookup(config.init)
  wrap = None if entry is None else entry[3]
  return config.variant if wrap is None else wrap(config.variant)


def init_method_names() -> tuple[str, ...]:
  """The names ``LoraConfig(init=...)`` accepts, as registered (for messages)."""
  return tuple(entry[1] for entry in _INIT_METHODS)


def _default_init(key: jax.Array, spec: LoraSpec, w0: Any, config: LoraConfig):
  ka, kb = jax.random.split(key)
  if spec.layout.embedding:
    # PEFT: lora_embedding_A = 0, lora_embedding_B ~ N(0, 1).
    return w0, {"a": jnp.zeros(spec.a_shape), "b": jax.random.normal(kb, spec.b_shape, jnp.float32)}
  if config.init == "default":
    # PEFT: kaiming_uniform_(A, a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / np.sqrt(spec.fan_in)
    a = jax.random.uniform(ka, spec.a_shape, jnp.float32, -bound, bound)
  else:  # "gaussian": PEFT's normal_(A, std=1/r)
    a = jax.random.normal(ka, spec.a_shape, jnp.float32) / spec.rank
  return w0, {"a": a, "b": jnp.zeros(spec.b_shape, jnp.float32)}


register_init("default", _default_init)
register_init("gaussian", _default_init)
