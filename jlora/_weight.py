"""``LoraWeight``: the pytree node that replaces a targeted kernel (W0 beside A and B)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._config import KernelLayout, adapter_scale
from jlora._lazy import is_lazy_node
from jlora._tree import describe_leaf
from jlora._variant import PLAIN, Variant


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
  # The adapter family (plain LoRA, DoRA, a bank of adapters...): its children and apply rules.
  variant: Variant = PLAIN

  @property
  def scale(self) -> float:
    """The output scale ``alpha/rank`` (``alpha/sqrt(rank)`` with rsLoRA)."""
    return adapter_scale(alpha=self.alpha, rank=self.rank, rslora=self.rslora)

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
  def factor_axes(self) -> dict[str, tuple[int | str, ...]]:
    """Axis spec of every child beyond ``w0`` (see ``jlora.Variant``)."""
    return self.variant.factor_axes(self)

  @property
  def factor_shapes(self) -> dict[str, tuple[int, ...]]:
    special = self.variant.special_sizes(self)
    return {name: tuple(special[ax] if isinstance(ax, str) else self.shape[ax] for ax in axes)
            for name, axes in self.factor_axes.items()}

  @property
  def a_shape(self) -> tuple[int, ...]:
    return self.factor_shapes["a"]

  @property
  def b_shape(self) -> tuple[int, ...]:
    return self.factor_shapes["b"]

  @property
  def fan_in(self) -> int:
    return int(np.prod([self.shape[i] for i in self.in_axes], dtype=np.int64))

  @property
  def fan_out(self) -> int:
    return int(np.prod([self.shape[i] for i in self.out_axes], dtype=np.int64))


@jax.tree_util.register_pytree_with_keys_class
class LoraWeight:
  """A targeted kernel: frozen base ``w0`` plus the adapter's children.

  For plain LoRA the children are the trainable factors ``a`` and ``b`` and the
  effective kernel is ``w0 + spec.scale * (a ⊗ b)`` where ``a`` has shape
  ``(*batch, *in, r)`` and ``b`` has shape ``(*batch, r, *out)``; ``jlora.wrap``
  never builds that sum, it computes ``x·w0 + scale·((x·a)·b)``. Variants
  (``spec.variant``) add children, e.g. DoRA's magnitude, held in ``extras``.

  Any child may be ``None`` in the halves produced by ``jlora.split``
  (adapters only, or frozen only).
  """

  __slots__ = ("w0", "factors", "spec")

  def __init__(self, w0: Any, a: Any, b: Any, spec: LoraSpec, extras: Mapping[str, Any] | None = None):
    names = tuple(spec.factor_axes)
    factors = {"a": a, "b": b, **(dict(extras) if extras else {})}
    if tuple(sorted(factors)) != tuple(sorted(names)):
      raise ValueError(f"LoraWeight: a {spec.variant.name!r} adapter has children {names}, got "
                       f"{tuple(factors)}.")
    object.__setattr__(self, "w0", w0)
    object.__setattr__(self, "factors", {n: factors[n] for n in names})
    object.__setattr__(self, "spec", spec)

  def __setattr__(self, name, value):
    raise AttributeError("LoraWeight is immutable; use .replace(...) to get a modified copy.")

  @property
  def a(self) -> Any:
    return self.factors["a"]

  @property
  def b(self) -> Any:
    return self.factors["b"]

  @property
  def extras(self) -> dict[str, Any]:
    """Children beyond ``w0``, ``a`` and ``b`` (a variant's own parameters)."""
    return {n: v for n, v in self.factors.items() if n not in ("a", "b")}

  def tree_flatten_with_keys(self):
    GK = jax.tree_util.GetAttrKey
    return ((GK("w0"), self.w0), *((GK(n), v) for n, v in self.factors.items())), self.spec

  @classmethod
  def tree_unflatten(cls, spec, children):
    w0, a, b, *rest = children
    names = tuple(spec.factor_axes)[2:]
    return cls(w0, a, b, spec, dict(zip(names, rest)))

  def replace(self, **kwargs) -> "LoraWeight":
    """A copy with some children (``w0``, ``a``, ``b``, an extra's name) or ``spec`` replaced."""
    fields = {"w0": self.w0, "spec": self.spec, **self.factors}
    unknown = set(kwargs) - set(fields)
    if unknown:
      raise ValueError(f"LoraWeight.replace: unknown field(s) {sorted(unknown)}; fields: {sorted(fields)}.")
    fields.update(kwargs)
    w0, spec, a, b = fields.pop("w0"), fields.pop("spec"), fields.pop("a"), fields.pop("b")
    return LoraWeight(w0, a, b, spec, fields)

  def trainable(self, name: str) -> bool:
    """Whether child ``name`` is a trained parameter (``w0`` never is)."""
    return name != "w0" and self.spec.variant.trainable(name)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.spec.shape

  @property
  def is_complete(self) -> bool:
    return self.w0 is not None and all(v is not None for v in self.factors.values())

  def __repr__(self) -> str:
    kids = ", ".join(f"{n}={describe_leaf(v)}" for n, v in (("w0", self.w0), *self.factors.items()))
    variant = self.spec.variant.describe()
    return (f"LoraWeight({kids}, rank={self.spec.rank}, scale={self.spec.scale:g}"
            + (f", variant={variant}" if variant else "") + ")")


def is_lora_weight(x: Any) -> bool:
  return isinstance(x, LoraWeight)


def is_node(x: Any) -> bool:
  """Leaves of jlora's traversals: adapters, and kernels stored in another form (``jlora._lazy``)."""
  return isinstance(x, LoraWeight) or is_lazy_node(x)


def delta(weight: LoraWeight, *, dtype: Any = jnp.float32) -> jax.Array:
  """The dense update laid out like ``w0``, computed in ``dtype`` (the variant decides).

  Only merge and export call this; the apply path never builds it.
  """
  return weight.spec.variant.delta(weight, dtype)
