"""``Variant``: how one family of adapters is stored, applied and merged.

Plain LoRA is the base class. A variant (DoRA, AdaLoRA, a bank of adapters
served in one batch, ...) is a frozen, hashable subclass stored in
``LoraSpec.variant``; it names the adapter's children beyond the frozen base
``w0`` and lays out their axes, and it decides what the low-rank path computes
where the kernel is consumed. Every structural operation of the apply path
(transposes, reshapes, slices, ``scan`` over stacked layers) moves all the
children along with the kernel, so a variant only writes what differs: its
storage and its consumers. Variants are found by ``name`` when a checkpoint is
read back (``Variant.from_json``).

Axis specs: each child is described by a tuple whose entries are kernel axis
indices (the child has that kernel axis, same size) or special axis names:
``"rank"`` (the adapter rank) and any name the variant sizes in
``special_sizes`` (e.g. ``"slot"`` for a bank of adapters).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # pragma: no cover
  from jlora._apply.context import ConsumerContext
  from jlora._weight import LoraSpec, LoraWeight

AxisSpec = tuple[int | str, ...]

_REGISTRY: dict[str, type["Variant"]] = {}


@dataclasses.dataclass(frozen=True)
class Variant:
  """Plain LoRA: ``W = W0 + scale·(A⊗B)``; subclasses define the other variants.

  Example:
    >>> import jlora
    >>> spec = jlora.LoraSpec(shape=(16, 32), layout=jlora.KernelLayout(in_axes=(0,)), rank=4, alpha=8.0)
    >>> jlora.Variant().factor_axes(spec)
    {'a': (0, 'rank'), 'b': ('rank', 1)}
  """

  name: ClassVar[str] = "lora"
  # The init method this family needs when ``LoraConfig.init`` is left at "default"
  # (e.g. AdaLoRA's N(0, 0.02) factors); ``None``: the configured one.
  default_init: ClassVar[str | None] = None

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if "name" in cls.__dict__:
      _REGISTRY[cls.name] = cls

  # -- storage ---------------------------------------------------------------------------
  def factor_axes(self, spec: LoraSpec) -> dict[str, AxisSpec]:
    """Every child beyond ``w0``, in flattening order: ``a`` and ``b`` first."""
    return {
        "a": (*spec.batch_axes, *spec.in_axes, "rank"),
        "b": (*spec.batch_axes, "rank", *spec.out_axes),
    }

  def special_sizes(self, spec: LoraSpec) -> dict[str, int]:
    """Sizes of the special (non-kernel) axes named in ``factor_axes``."""
    return {"rank": spec.rank}

  def trainable(self, name: str) -> bool:
    """Whether child ``name`` is trained (``a`` and ``b`` always are)."""
    del name
    return True

  def init_extras(self, spec: LoraSpec, w0: Any, factors: Mapping[str, Any]) -> dict[str, Any]:
    """Initial values of the children beyond ``a`` and ``b`` (``jlora.init``), e.g. DoRA's magnitude."""
    del spec, w0, factors
    return {}

  def to_json(self) -> dict[str, Any]:
    """JSON form for checkpoint metadata (``name`` plus the dataclass fields)."""
    return {"name": self.name, **dataclasses.asdict(self)}

  @staticmethod
  def from_json(d: Mapping[str, Any] | None) -> "Variant":
    if not d:
      return PLAIN
    d = dict(d)
    name = d.pop("name", "lora")
    if name not in _REGISTRY:
      raise ValueError(f"unknown LoRA variant {name!r} (known: {sorted(_REGISTRY)}); "
                       "is the package that defines it imported?")
    return _REGISTRY[name](**d)

  def describe(self) -> str:
    return "" if type(self) is Variant else self.name

  # -- the apply path ------------------------------------------------------------------------
  # The interpreter calls these where the kernel is consumed, with its context ``ctx`` (a
  # ``jlora._apply.context.ConsumerContext``: the lowering options, dropout keys, per-call inputs
  # such as ``adapter_ids``), the ``LowRank`` value, the layer input, the base result and, for a
  # matmul, a ``DotPlan`` (``jlora._apply.consumers.plans``); each returns the layer output.
  # Plain LoRA's rules are apply-path code, registered here by the apply path (see below).
  def dot(self, ctx: ConsumerContext, v: Any, x: Any, base_out: Any, plan: Any) -> Any:
    """The output of ``dot_general``: plain LoRA adds ``scale·((x·A)·B)`` to ``base_out``."""
    return _plain_rule("dot")(ctx, v, x, base_out, plan)

  def conv(self, ctx: ConsumerContext, v: Any, x: Any, base_out: Any, params: dict) -> Any:
    """The output of a convolution: plain LoRA adds a conv to ``rank`` channels, then ``B``."""
    return _plain_rule("conv")(ctx, v, x, base_out, params)

  def gather(self, ctx: ConsumerContext, v: Any, indices: Any, base_out: Any, params: dict) -> Any:
    """The output of a lookup: plain LoRA adds the looked-up rows of ``A`` projected by ``B``."""
    return _plain_rule("gather")(ctx, v, indices, base_out, params)

  def ragged_dot(self, ctx: ConsumerContext, v: Any, x: Any, group_sizes: Any, base_out: Any, plan: Any) -> Any:
    """The output of ``ragged_dot`` (routed experts): plain LoRA adds ``scale·ragged(ragged(x, A), B)``
    with the same group sizes; ``plan`` is a ``jlora._apply.consumers.ragged.RaggedPlan``."""
    return _plain_rule("ragged_dot")(ctx, v, x, group_sizes, base_out, plan)

  def scale_kernel(self, v: Any, c: Any, base: Any) -> Any:
    """The value of ``c·kernel`` (a scalar multiple): scales ``a``."""
    return v.scale_factor("a", c, base)

  # -- merging ------------------------------------------------------------------------------
  def delta(self, w: LoraWeight, dtype: Any) -> Any:
    """The dense update laid out like ``w0`` (merge and export only)."""
    return lowrank_delta(w, dtype=dtype)

  def merged(self, w: LoraWeight, w0: Any) -> Any:
    """The merged kernel in float32 from the float32 base ``w0``."""
    return w0 + self.delta(w, jnp.float32)


def lowrank_delta(weight: LoraWeight, *, dtype: Any = jnp.float32) -> jax.Array:
  """``scale · (a ⊗ b)`` laid out like ``w0`` (plain LoRA factors), computed in ``dtype``.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> from jlora._variant import lowrank_delta
    >>> spec = jlora.LoraSpec(shape=(3, 2), layout=jlora.KernelLayout(in_axes=(0,)), rank=1, alpha=2.0)
    >>> w = jlora.LoraWeight(jnp.zeros((3, 2)), jnp.ones((3, 1)), jnp.ones((1, 2)), spec)
    >>> lowrank_delta(w).tolist()
    [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
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


# -- plain LoRA's consumer rules: a hook the apply path fills --------------------------------------
# ``Variant.dot``/``conv``/``gather``/``ragged_dot`` above are plain LoRA's rules, which are apply-path code
# (``jlora._apply.consumers.plain``), a layer above this one. The apply path registers them here
# when it is imported (``import jlora`` imports it), and only the apply path calls these methods.
_PLAIN_RULES: dict[str, Callable[..., Any]] = {}


def register_plain_rules(*, dot: Callable[..., Any], conv: Callable[..., Any], gather: Callable[..., Any],
                         ragged_dot: Callable[..., Any]) -> None:
  """Installs plain LoRA's consumer rules, the defaults of ``Variant.dot``/``conv``/``gather``/``ragged_dot``."""
  _PLAIN_RULES.update(dot=dot, conv=conv, gather=gather, ragged_dot=ragged_dot)


def _plain_rule(kind: str) -> Callable[..., Any]:
  rule = _PLAIN_RULES.get(kind)
  if rule is None:  # pragma: no cover - the apply path registers them when it is imported
    raise RuntimeError("jlora's apply path (jlora._apply.consumers.plain) is not imported")
  return rule


_REGISTRY["lora"] = Variant
PLAIN = Variant()
