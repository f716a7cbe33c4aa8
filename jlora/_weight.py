"""``LoraWeight``: the pytree node that replaces a targeted kernel (W0 beside A and B)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._config import KernelLayout


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraSpec:
  """Static description of one adapter (hashable; stored as pytree aux data)."""

  # Shape of the frozen base kernel W0.
  shape: tuple[int, ...]
  # Which kernel axes A and B cover (normalized, sorted).
  layout: KernelLayout
  rank: int
  alpha: float
  rslora: bool = False
  dropout: float = 0.0

  @property
  def scale(self) -> float:
    return float(self.alpha) / (math.sqrt(self.rank) if self.rslora else self.rank)

  @property
  def in_axes(self) -> tuple[int, ...]:
    return self.layout.in_axes

  @property
  def batch_axes(self) -> tuple[int, ...]:
    return self.layout.batch_axes

  @property
  def out_axes(self) -> tuple[int, ...]:
    return self.layout.out_axes(len(self.shape))

  @property
  def a_shape(self) -> tuple[int, ...]:
    s = self.shape
    return (*(s[i] for i in self.batch_axes), *(s[i] for i in self.in_axes), self.rank)

  @property
  def b_shape(self) -> tuple[int, ...]:
    s = self.shape
    return (*(s[i] for i in self.batch_axes), self.rank, *(s[i] for i in self.out_axes))

  @property
  def fan_in(self) -> int:
    return int(np.prod([self.shape[i] for i in self.in_axes], dtype=np.int64))

  @property
  def fan_out(self) -> int:
    return int(np.prod([self.shape[i] for i in self.out_axes], dtype=np.int64))


@jax.tree_util.register_pytree_with_keys_class
class LoraWeight:
  """A targeted kernel: frozen base ``w0`` plus trainable factors ``a`` and ``b``.

  The effective kernel is ``w0 + spec.scale * (a ⊗ b)`` where ``a`` has shape
  ``(*batch, *in, r)`` and ``b`` has shape ``(*batch, r, *out)``; ``jlora.wrap``
  never builds that sum, it computes ``x·w0 + scale·((x·a)·b)``.

  Any of the three children may be ``None`` in the halves produced by
  ``jlora.split`` (adapters only, or frozen only).
  """

  __slots__ = ("w0", "a", "b", "spec")

  def __init__(self, w0: Any, a: Any, b: Any, spec: LoraSpec):
    object.__setattr__(self, "w0", w0)
    object.__setattr__(self, "a", a)
    object.__setattr__(self, "b", b)
    object.__setattr__(self, "spec", spec)

  def __setattr__(self, name, value):
    raise AttributeError("LoraWeight is immutable; use .replace(...) to get a modified copy.")

  def tree_flatten_with_keys(self):
    GK = jax.tree_util.GetAttrKey
    return ((GK("w0"), self.w0), (GK("a"), self.a), (GK("b"), self.b)), self.spec

  @classmethod
  def tree_unflatten(cls, spec, children):
    return cls(*children, spec)

  def replace(self, **kwargs) -> "LoraWeight":
    fields = {"w0": self.w0, "a": self.a, "b": self.b, "spec": self.spec}
    fields.update(kwargs)
    return LoraWeight(**fields)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.spec.shape

  @property
  def is_complete(self) -> bool:
    return self.w0 is not None and self.a is not None and self.b is not None

  def __repr__(self) -> str:
    return (
        f"LoraWeight(w0={describe_leaf(self.w0)}, a={describe_leaf(self.a)}, b={describe_leaf(self.b)}, "
        f"rank={self.spec.rank}, scale={self.spec.scale:g})"
    )


def describe_leaf(x: Any) -> str:
  """``dtype[shape]`` for an array-like child of a jlora pytree node, ``repr`` for anything else.

  Pytree nodes print whatever their children are: arrays, ``None`` halves of
  ``jlora.split``, or the results of ``jax.tree.map`` (shapes, strings, ...).

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora._weight import describe_leaf
    >>> describe_leaf(jnp.ones((2, 3))), describe_leaf((2, 3)), describe_leaf(None)
    ('float32[2, 3]', '(2, 3)', 'None')
  """
  shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
  if isinstance(shape, tuple) and dtype is not None:
    try:
      return f"{np.dtype(dtype).name}{list(shape)}"
    except TypeError:  # e.g. a PRNG key dtype
      return f"{dtype}{list(shape)}"
  return repr(x)


def is_lora_weight(x: Any) -> bool:
  return isinstance(x, LoraWeight)


def delta(weight: LoraWeight, *, dtype: Any = jnp.float32) -> jax.Array:
  """The dense update ``scale · (a ⊗ b)`` laid out like ``w0``, computed in ``dtype``.

  Only merge and export call this; the apply path never builds it.
  """
  spec = weight.spec
  nd = len(spec.shape)
  letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXY"
  r = "Z"
  sa = "".join(letters[i] for i in spec.batch_axes + spec.in_axes) + r
  sb = "".join(letters[i] for i in spec.batch_axes) + r + "".join(letters[i] for i in spec.out_axes)
  out = letters[:nd]
  a = jnp.asarray(weight.a, dtype)
  b = jnp.asarray(weight.b, dtype)
  d = jnp.einsum(f"{sa},{sb}->{out}", a, b, precision=jax.lax.Precision.HIGHEST)
  return d * jnp.asarray(spec.scale, dtype)
