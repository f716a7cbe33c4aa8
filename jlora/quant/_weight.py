"""``NF4Weight``: a frozen kernel stored in bitsandbytes' 4-bit format, as a pytree node."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jlora._lazy import Deferred
from jlora.quant._fingerprint import nf4_digest
from jlora.quant._format import Decoder, NF4Format

_NAMES = ("packed", "absmax", "nested_absmax", "nested_offset")


@jax.tree_util.register_pytree_with_keys_class
class NF4Weight:
  """A kernel quantized to 4 bits (NF4 or FP4) in bitsandbytes' format.

  Its children are exactly the stored arrays (``packed`` codes, block
  ``absmax``, and with double quantization ``nested_absmax`` and
  ``nested_offset``), so ``sum(x.nbytes for x in jax.tree.leaves(tree))`` is the
  true storage; ``format`` (static) holds the dense shape, dtypes, blocksize
  and layout. It stands for a kernel of ``shape`` and dtype ``dtype`` (the
  compute dtype) everywhere in jlora: ``jlora.wrap`` decodes it inside each
  consumer (recomputed for the backward pass, never saved), ``jlora.init``
  adds adapters over it, ``jlora.merge`` folds them into a dense kernel.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> q = jlora.quantize({"w": jnp.ones((128, 64))}, targets="w")["w"]
    >>> q.shape, q.dtype.name, q.packed.shape
    ((128, 64), 'float32', (64, 64))
  """

  __slots__ = ("packed", "absmax", "nested_absmax", "nested_offset", "format")

  def __init__(self, packed: Any, absmax: Any, nested_absmax: Any = None, nested_offset: Any = None, *,
               format: NF4Format):  # noqa: A002 - bitsandbytes' word
    object.__setattr__(self, "packed", packed)
    object.__setattr__(self, "absmax", absmax)
    object.__setattr__(self, "nested_absmax", nested_absmax)
    object.__setattr__(self, "nested_offset", nested_offset)
    object.__setattr__(self, "format", format)

  def __setattr__(self, name, value):
    raise AttributeError("NF4Weight is immutable.")

  @classmethod
  def from_storage(cls, storage: dict[str, Any], format: NF4Format) -> "NF4Weight":  # noqa: A002
    """Builds a node from its stored arrays by name (checked against ``format``)."""
    want = set(format.stored_shapes())
    if set(storage) != want:
      raise ValueError(f"NF4Weight: a {format.quant_type} kernel with double_quant={format.double_quant} stores "
                       f"{sorted(want)}, got {sorted(storage)}.")
    return cls(**{k: storage.get(k) for k in _NAMES}, format=format)

  @property
  def storage(self) -> dict[str, Any]:
    """The stored arrays by name."""
    names = _NAMES if self.format.double_quant else _NAMES[:2]
    return {n: getattr(self, n) for n in names}

  def tree_flatten_with_keys(self):
    return tuple((jax.tree_util.GetAttrKey(n), v) for n, v in self.storage.items()), self.format

  @classmethod
  def tree_unflatten(cls, fmt, children):
    return cls(*children, format=fmt)

  # -- what it stands for ------------------------------------------------------------------------

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the dense kernel."""
    return self.format.shape

  @property
  def ndim(self) -> int:
    return len(self.format.shape)

  @property
  def dtype(self) -> np.dtype:
    """dtype of the dense kernel in the apply path (the compute dtype)."""
    return jnp.dtype(self.format.decode_dtype)

  @property
  def nbytes(self) -> int:
    """Bytes actually stored."""
    return int(sum(np.prod(v.shape, dtype=np.int64) * jnp.dtype(v.dtype).itemsize
                   for v in self.storage.values()))

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """The dense kernel in ``dtype`` (default: the original dtype), decoded in float32."""
    if any(isinstance(v, jax.core.Tracer) for v in self.storage.values()):
      return self.format.decode(self.storage, dtype or self.format.dtype)
    return _decoder(self.format, jnp.dtype(dtype or self.format.dtype).name)(self.storage)

  def __jlora_lazy__(self) -> Deferred:
    return Deferred(self.storage, Decoder(self.format), self.format.shape, self.format.decode_dtype)

  # -- sharding ------------------------------------------------------------------------------------

  def __jlora_specs__(self, kernel_spec: P, axis_size: Any = None) -> "NF4Weight":
    """PartitionSpecs of the stored arrays for a kernel sharded as ``kernel_spec``.

    Stacked axes keep their spec on every array. In the row layout (single input and
    output axis) ``packed``/``absmax`` are ``[out, in/k]`` and take the kernel's
    output/input specs (an axis whose stored size does not divide over its mesh axes,
    per ``axis_size(entry)``, is left unsharded); the flat layout and the nested
    statistics are replicated within a layer.
    """
    f = self.format
    k = tuple(kernel_spec) + (None,) * (len(f.shape) - len(tuple(kernel_spec)))
    stack = k[:f.stack]
    size = axis_size or (lambda entry: 1)
    shapes = f.stored_shapes()

    def fits(entry, n):
      return entry if entry is None or n % size(entry) == 0 else None

    specs = {}
    for name, shape in shapes.items():
      tail: tuple = (None,) * (len(shape) - f.stack)
      if f.rows and name in ("packed", "absmax") and len(f.in_axes) == 1 and len(f.out_axes) == 1:
        tail = (fits(k[f.out_axes[0]], shape[-2]), fits(k[f.in_axes[0]], shape[-1]))
      specs[name] = P(*stack, *tail)
    return NF4Weight.from_storage(specs, f)

  def kernel_spec(self) -> P | None:
    """The kernel PartitionSpec these stored arrays (or specs) correspond to."""
    f = self.format
    packed = self.packed
    spec = packed if isinstance(packed, P) else getattr(getattr(packed, "sharding", None), "spec", None)
    if spec is None:
      return None
    s = tuple(spec) + (None,) * (len(f.stored_shapes()["packed"]) - len(tuple(spec)))
    k = [None] * len(f.shape)
    k[:f.stack] = s[:f.stack]
    if f.rows and len(f.in_axes) == 1 and len(f.out_axes) == 1:
      k[f.out_axes[0]], k[f.in_axes[0]] = s[-2], s[-1]
    return P(*k)

  @property
  def sharding(self) -> Any:
    """The dense kernel's equivalent sharding (what adapters over it derive theirs from)."""
    sh = getattr(self.packed, "sharding", None)
    if isinstance(sh, NamedSharding):
      return NamedSharding(sh.mesh, self.kernel_spec())
    return sh

  # -- base fingerprint ----------------------------------------------------------------------------

  def __jlora_digest__(self, samples: int) -> bytes:
    return nf4_digest(self, samples)

  def __repr__(self) -> str:
    f = self.format
    kind = f"{f.quant_type}{'+dq' if f.double_quant else ''}/{f.blocksize}"
    return f"NF4Weight({jnp.dtype(f.dtype).name}{list(f.shape)}, {kind}, {self.nbytes if _concrete(self) else '?'} bytes)"


@functools.lru_cache(maxsize=None)
def _decoder(fmt: NF4Format, dtype: str):
  return jax.jit(lambda storage: fmt.decode(storage, dtype))


def _concrete(w: NF4Weight) -> bool:
  return all(hasattr(v, "shape") and hasattr(v, "dtype") for v in w.storage.values())


def is_nf4(x: Any) -> bool:
  return isinstance(x, NF4Weight)
