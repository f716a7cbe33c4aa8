"""Deferred kernels: frozen bases stored in another form (e.g. 4-bit codes) until their use.

A pytree node whose class defines ``__jlora_lazy__(self) -> LazyBase`` is a
*lazy kernel*. ``jlora.wrap`` traces the wrapped function with a placeholder
of the dense shape and dtype in its place; in the apply path the
``LazyBase`` records the structural operations the model applies to the
kernel (casts, transposes, reshapes) and is materialised only inside the
consumer (matmul, convolution, lookup), under a custom VJP so that the dense
kernel is decoded again for the backward pass instead of being saved
(``jlora._apply.base_result``). Under ``scan`` over stacked layers it is split
along its leading axis first, so one layer's kernel is materialised at a time.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp

from jlora._errors import Unsupported


class LazyBase(abc.ABC):
  """The apply path's view of a lazy kernel; implementations must be pytrees (children = stored arrays)."""

  @property
  @abc.abstractmethod
  def shape(self) -> tuple[int, ...]:
    """Shape of the dense value (after the recorded operations)."""

  @property
  @abc.abstractmethod
  def dtype(self) -> Any:
    """dtype of the dense value (after the recorded operations)."""

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @abc.abstractmethod
  def record(self, primitive: Any, params: dict, rest: list) -> "LazyBase":
    """This value with one more single-output structural op applied (``rest``: other operands).

    Raise ``jlora._errors.Unsupported`` for an op that cannot be deferred."""

  @abc.abstractmethod
  def materialize(self) -> jax.Array:
    """The dense value: decode the stored form, then replay the recorded ops."""

  def materialize_as(self, dtype: Any) -> jax.Array:
    """The dense value decoded straight to ``dtype`` (e.g. float32 for a merge); by default
    ``materialize()`` cast."""
    return self.materialize().astype(dtype)

  @abc.abstractmethod
  def scan_split(self) -> tuple[Any, Any]:
    """``(children, rebuild)``: children with the leading (stacked) axis first, for ``lax.scan``,
    and ``rebuild(sliced_children) -> LazyBase`` for one slice."""


def is_lazy_node(x: Any) -> bool:
  """True for pytree nodes that stand for a kernel stored in another form (``__jlora_lazy__``)."""
  return hasattr(type(x), "__jlora_lazy__")


def lazy_of(x: Any) -> LazyBase:
  return type(x).__jlora_lazy__(x)


def dense(x: Any, dtype: Any = None) -> jax.Array:
  """The dense value of a kernel, materialising a lazy one (in its compute dtype, or straight
  to ``dtype``: a 4-bit kernel is then decoded in float32 without a detour through bfloat16)."""
  if is_lazy_node(x):
    lz = lazy_of(x)
    return lz.materialize() if dtype is None else lz.materialize_as(dtype)
  return jnp.asarray(x) if dtype is None else jnp.asarray(x).astype(dtype)


def placeholder(x: Any) -> jax.ShapeDtypeStruct:
  """What the wrapped function is traced with in place of a lazy kernel."""
  lz = lazy_of(x)
  return jax.ShapeDtypeStruct(tuple(lz.shape), lz.dtype)


# Ops that commute with slicing the leading (stacked) axis: allowed before a ``scan`` split.
_ELEMENTWISE = ("convert_element_type", "copy", "reduce_precision", "mul", "div", "neg", "sharding_constraint")


@jax.tree_util.register_pytree_node_class
class Deferred(LazyBase):
  """A ``LazyBase`` that decodes stored arrays, then replays the recorded structural ops.

  ``storage`` is a pytree of arrays; ``decode(storage, shape)`` (static, e.g. a
  module-level function) returns the dense kernel of ``shape`` (in its compute
  dtype ``dtype``). For stacked kernels every storage array must have the
  stacked axis first, so that a ``scan`` over layers can slice the storage and
  decode one layer at a time.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora._lazy import Deferred
    >>> def decode(s, shape):  # int8 codes times one scale
    ...   return (s["q"].astype(jnp.float32) * s["scale"]).reshape(shape)
    >>> lz = Deferred({"q": jnp.ones((2, 3), jnp.int8), "scale": jnp.float32(0.5)}, decode, (2, 3), jnp.float32)
    >>> lz.materialize().sum()
    Array(3., dtype=float32)
  """

  def __init__(self, storage: Any, decode: Any, shape: tuple[int, ...], dtype: Any,
               ops: tuple = (), operands: tuple = (), aval: Any = None):
    self.storage = storage
    self.decode = decode
    self.dense_shape = tuple(shape)
    self.dense_dtype = jnp.dtype(dtype)
    self.ops = tuple(ops)  # ((primitive, params), ...)
    self.operands = tuple(operands)  # the other operands of each recorded op (arrays or scalars)
    self.aval = aval if aval is not None else jax.ShapeDtypeStruct(self.dense_shape, self.dense_dtype)

  def tree_flatten(self):
    return (self.storage, self.operands), (self.decode, self.dense_shape, self.dense_dtype, self.ops, self.aval)

  @classmethod
  def tree_unflatten(cls, aux, children):
    decode, shape, dtype, ops, aval = aux
    storage, operands = children
    return cls(storage, decode, shape, dtype, ops, operands, aval)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.aval.shape)

  @property
  def dtype(self) -> Any:
    return self.aval.dtype

  def record(self, primitive: Any, params: dict, rest: list) -> "Deferred":
    params = primitive.get_bind_params(params)

    def apply(dense, rest):
      return primitive.bind(dense, *rest, **params)

    aval = jax.eval_shape(apply, self.aval, list(rest))
    aval = jax.ShapeDtypeStruct(aval.shape, aval.dtype)
    return Deferred(self.storage, self.decode, self.dense_shape, self.dense_dtype,
                    self.ops + ((primitive, params),), self.operands + (tuple(rest),), aval)

  def materialize(self) -> jax.Array:
    x = self.decode(self.storage, self.dense_shape).astype(self.dense_dtype)
    for (primitive, params), rest in zip(self.ops, self.operands):
      x = primitive.bind(x, *rest, **params)
    return x

  def materialize_as(self, dtype: Any) -> jax.Array:
    if self.ops:  # recorded ops expect the compute dtype
      return self.materialize().astype(dtype)
    return self.decode(self.storage, self.dense_shape).astype(dtype)

  def scan_split(self) -> tuple[Any, Any]:
    bad = [p.name for p, _ in self.ops if p.name not in _ELEMENTWISE]
    if bad:
      raise Unsupported(f"a stored-in-another-form kernel (e.g. 4-bit) that goes through {bad[0]!r} "
                        "before lax.scan slices its layers")
    ops, operands = self.ops, self.operands
    decode, shape, dtype = self.decode, self.dense_shape[1:], self.dense_dtype
    ops = tuple((p, _drop_leading(p, params)) for p, params in ops)

    def rebuild(storage):
      return Deferred(storage, decode, shape, dtype, ops, operands)

    return self.storage, rebuild


def _drop_leading(primitive: Any, params: dict) -> dict:
  """Params of an elementwise op for a slice without the leading axis."""
  if primitive.name == "sharding_constraint":
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = params["sharding"]
    if isinstance(sharding, NamedSharding):
      params = dict(params, sharding=NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:])))
  return params
