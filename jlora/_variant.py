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
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
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
  def factor_axes(self, spec: "LoraSpec") -> dict[str, AxisSpec]:
    """Every child beyond ``w0``, in flattening order: ``a`` and ``b`` first."""
    return {
        "a": (*spec.batch_axes, *spec.in_axes, "rank"),
        "b": (*spec.batch_axes, "rank", *spec.out_axes),
    }

  def special_sizes(self, spec: "LoraSpec") -> dict[str, int]:
    """Sizes of the special (non-kernel) axes named in ``factor_axes``."""
    return {"rank": spec.rank}

  def trainable(self, name: str) -> bool:
    """Whether child ``name`` is trained (``a`` and ``b`` always are)."""
    del name
    return True

  def init_extras(self, spec: "LoraSpec", w0: Any, factors: Mapping[str, Any]) -> dict[str, Any]:
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
  # Each consumer gets the interpreter context (``ctx``: dropout key, ``adapter_ids`` ...),
  # the ``LowRank`` value, the layer input, the base result and a plan from
  # ``jlora._consumers``; it returns the layer output. See ``_consumers`` for the plans.
  def dot(self, ctx: Any, v: Any, x: Any, base_out: Any, plan: Any) -> Any:
    from jlora import _consumers

    return _consumers.add_term(ctx, v, base_out, _consumers.lora_dot_term(ctx, v, x, plan, scale=v.source.spec.scale))

  def conv(self, ctx: Any, v: Any, x: Any, base_out: Any, params: dict) -> Any:
    from jlora import _consumers

    return base_out + _consumers.conv(v, x, params=params, out_dtype=base_out.dtype, key=ctx.next_key())

  def gather(self, ctx: Any, v: Any, indices: Any, base_out: Any, params: dict) -> Any:
    from jlora import _consumers

    return base_out + _consumers.gather(v, indices, params=params, out_dtype=base_out.dtype)

  def scale_kernel(self, v: Any, c: Any, base: Any) -> Any:
    """The value of ``c·kernel`` (a scalar multiple): scales ``a``."""
    return v.scale_factor("a", c, base)

  # -- merging ------------------------------------------------------------------------------
  def delta(self, w: "LoraWeight", dtype: Any) -> Any:
    """The dense update laid out like ``w0`` (merge and export only)."""
    from jlora._weight import lowrank_delta

    return lowrank_delta(w, dtype=dtype)

  def merged(self, w: "LoraWeight", w0: Any) -> Any:
    """The merged kernel in float32 from the float32 base ``w0``."""
    import jax.numpy as jnp

    return w0 + self.delta(w, jnp.float32)


_REGISTRY["lora"] = Variant
PLAIN = Variant()
