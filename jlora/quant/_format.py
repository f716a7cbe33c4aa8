"""``NF4Format``: how a JAX kernel maps onto bitsandbytes' 4-bit storage, and the codec.

bitsandbytes quantizes a PyTorch ``[out, in]`` weight flattened row-major. A JAX
kernel is the transpose of that (``(in, out)`` for ``nn.Dense``), possibly with
several input or output axes (``DenseGeneral``) and stacked layers in front
(``(layers, in, out)`` under ``lax.scan``). Each stacked index is quantized as
its own bitsandbytes matrix ``W[l] = kernel[l].transpose(out, in).reshape(out, in)``.

Stored arrays, per matrix (stacked axes in front of each):

* ``packed`` uint8: ``(out, in/2)`` when ``in`` is a multiple of the blocksize
  (then every block lies in one row: the *row* layout, which shards like the
  kernel), else ``(ceil(out·in/2),)`` (blocks straddle rows: the *flat* layout).
  Either way the bytes are bitsandbytes' ``weight`` in order.
* ``absmax``: float32 per block, or the uint8 codes of the double quantization;
  ``(out, in/blocksize)`` or ``(nblocks,)`` likewise.
* double quantization only: ``nested_absmax`` float32 ``(ceil(nblocks/256),)``
  and ``nested_offset`` float32 ``()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.quant import _blockwise, _codebook

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NF4Format:
  """Static description of a quantized kernel (hashable: the pytree aux data of ``NF4Weight``).

  Example:
    >>> from jlora.quant import NF4Format
    >>> f = NF4Format(shape=(2, 128, 96), dtype="bfloat16", in_axes=(1,), stack=1)
    >>> f.torch_shape, f.rows, f.stored_shapes()["absmax"]
    ((96, 128), True, (2, 96, 2))
  """

  # Dense kernel shape in the JAX layout, stacked axes first.
  shape: tuple[int, ...]
  # dtype of the original kernel (bitsandbytes' quant_state.dtype): what dequantize returns.
  dtype: str
  # Kernel axes contracted with the layer input (PyTorch's `in`); the other unstacked axes are `out`.
  in_axes: tuple[int, ...]
  # Number of leading stacked axes (one bitsandbytes matrix per stacked index).
  stack: int = 0
  # Elements per absmax block (bitsandbytes: 32..4096, QLoRA: 64).
  blocksize: int = 64
  # "nf4" (QLoRA) or "fp4".
  quant_type: str = "nf4"
  # Double quantization of the block absmaxes (8-bit dynamic codes in blocks of 256).
  double_quant: bool = True
  # dtype the apply path decodes to (None: the original dtype).
  compute_dtype: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
    object.__setattr__(self, "in_axes", tuple(sorted(int(a) for a in self.in_axes)))
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
    if self.compute_dtype is not None:
      object.__setattr__(self, "compute_dtype", jnp.dtype(self.compute_dtype).name)
    if self.blocksize not in BLOCKSIZES:
      raise ValueError(f"blocksize must be a power of two in 32..4096 (bitsandbytes' {BLOCKSIZES}), "
                       f"got {self.blocksize!r}.")
    if self.quant_type not in _codebook.QUANT_TYPES:
      raise ValueError(f"quant_type must be one of {_codebook.QUANT_TYPES}, got {self.quant_type!r}.")
    nd = len(self.shape)
    if not 0 <= self.stack <= nd - 2:
      raise ValueError(f"a kernel of shape {self.shape} cannot have {self.stack} stacked axes and "
                       "both input and output axes.")
    if not self.in_axes or any(a < self.stack or a >= nd for a in self.in_axes) or len(self.in_axes) == nd - self.stack:
      raise ValueError(f"in_axes {self.in_axes} of a kernel of shape {self.shape} with {self.stack} stacked "
                       "axes must name some, but not all, of the unstacked axes.")
    for d, name in ((jnp.dtype(self.dtype), "dtype"), (jnp.dtype(self.decode_dtype), "compute_dtype")):
      if not jnp.issubdtype(d, jnp.floating):
        raise ValueError(f"{name} must be a floating dtype, got {d}.")

  # -- derived layout ------------------------------------------------------------------------------

  @property
  def decode_dtype(self) -> str:
    return self.compute_dtype or self.dtype

  @property
  def out_axes(self) -> tuple[int, ...]:
    return tuple(a for a in range(self.stack, len(self.shape)) if a not in self.in_axes)

  @property
  def stack_shape(self) -> tuple[int, ...]:
    return self.shape[:self.stack]

  @property
  def n_in(self) -> int:
    return int(np.prod([self.shape[a] for a in self.in_axes]))

  @property
  def n_out(self) -> int:
    return int(np.prod([self.shape[a] for a in self.out_axes]))

  @property
  def torch_shape(self) -> tuple[int, int]:
    """One matrix's shape in PyTorch (bitsandbytes' ``quant_state.shape``)."""
    return (self.n_out, self.n_in)

  @property
  def numel(self) -> int:
    return self.n_out * self.n_in

  @property
  def num_blocks(self) -> int:
    return _blockwise.num_blocks(self.numel, self.blocksize)

  @property
  def num_nested_blocks(self) -> int:
    return _blockwise.num_blocks(self.num_blocks, _blockwise.NESTED_BLOCKSIZE)

  @property
  def rows(self) -> bool:
    """Whether every block lies within one row of the ``[out, in]`` matrix (row layout)."""
    return self.n_in % self.blocksize == 0

  def stored_shapes(self) -> dict[str, tuple[int, ...]]:
    """Shapes of the stored arrays (stacked axes first)."""
    s = self.stack_shape
    if self.rows:
      shapes = {"packed": (*s, self.n_out, self.n_in // 2), "absmax": (*s, self.n_out, self.n_in // self.blocksize)}
    else:
      shapes = {"packed": (*s, -(-self.numel // 2)), "absmax": (*s, self.num_blocks)}
    if self.double_quant:
      shapes.update(nested_absmax=(*s, self.num_nested_blocks), nested_offset=s)
    return shapes

  def stored_dtypes(self) -> dict[str, Any]:
    d = {"packed": jnp.uint8, "absmax": jnp.uint8 if self.double_quant else jnp.float32}
    if self.double_quant:
      d.update(nested_absmax=jnp.float32, nested_offset=jnp.float32)
    return d

  # -- kernel <-> PyTorch matrix ------------------------------------------------------------------

  def _layer_perm(self) -> tuple[int, ...]:
    """Permutation of one (unstacked) kernel's axes into (out..., in...) order."""
    return tuple(a - self.stack for a in (*self.out_axes, *self.in_axes))

  def to_torch(self, w: jax.Array) -> jax.Array:
    """One (unstacked) kernel -> its ``[out, in]`` matrix."""
    return jnp.transpose(w, self._layer_perm()).reshape(self.n_out, self.n_in)

  def from_torch(self, m: jax.Array) -> jax.Array:
    """``[..., out, in]`` matrices -> kernels (leading axes kept)."""
    lead = m.shape[:-2]
    dims = [self.shape[a] for a in (*self.out_axes, *self.in_axes)]
    m = m.reshape(*lead, *dims)
    inv = np.argsort(self._layer_perm())
    return jnp.transpose(m, (*range(len(lead)), *(len(lead) + int(i) for i in inv)))

  # -- codec ---------------------------------------------------------------------------------------

  def encode_layer(self, w: jax.Array) -> dict[str, jax.Array]:
    """Quantizes one (unstacked) kernel into its stored arrays (bitsandbytes' bytes)."""
    packed, absmax = _blockwise.quantize_4bit(self.to_torch(w).reshape(-1), self.blocksize, self.quant_type)
    out = {"packed": packed}
    if self.double_quant:
      offset = _blockwise.mean_f32(absmax)
      codes, nested = _blockwise.quantize_dynamic(absmax - offset)
      out.update(absmax=codes, nested_absmax=nested, nested_offset=offset)
    else:
      out["absmax"] = absmax
    layer = dataclasses.replace(self, shape=self.shape[self.stack:], stack=0,
                                in_axes=tuple(a - self.stack for a in self.in_axes))
    shapes = layer.stored_shapes()
    return {k: v.reshape(shapes[k]) for k, v in out.items()}

  def absmax_f32(self, storage: dict[str, jax.Array]) -> jax.Array:
    """Block absmaxes as float32 ``(..., nblocks)`` (decoding the double quantization)."""
    a = storage["absmax"]
    lead = a.shape[:a.ndim - (2 if self.rows else 1)]
    a = a.reshape(*lead, self.num_blocks)
    if not self.double_quant:
      return a
    return _blockwise.dequantize_dynamic(a, storage["nested_absmax"], storage["nested_offset"])

  def decode(self, storage: dict[str, jax.Array], dtype: Any = None) -> jax.Array:
    """Stored arrays (any number of leading stacked axes) -> dense kernels in ``dtype``.

    ``NF4[q] * absmax`` in float32, cast once: bitsandbytes' ``dequantize_4bit``.
    """
    dtype = jnp.dtype(dtype or self.decode_dtype)
    packed = storage["packed"]
    lead = packed.shape[:packed.ndim - (2 if self.rows else 1)]
    absmax = self.absmax_f32(storage)
    table = jnp.asarray(_codebook.code(self.quant_type))
    if self.rows:
      q = _blockwise.unpack(packed, self.n_in)  # (..., out, in)
      values = table[q.astype(jnp.int32)]
      absmax = absmax.reshape(*lead, self.n_out, self.n_in // self.blocksize)
      m = _blockwise.scale_blocks(values, absmax, self.blocksize)
    else:
      q = _blockwise.unpack(packed, self.numel)
      m = _blockwise.scale_blocks(table[q.astype(jnp.int32)], absmax, self.blocksize)
      m = m.reshape(*lead, self.n_out, self.n_in)
    return self.from_torch(m.astype(dtype))


@dataclasses.dataclass(frozen=True)
class Decoder:
  """The static decode function of a ``jlora._lazy.Deferred`` (hashable, compares by format).

  Decodes to float32; ``Deferred`` casts to the compute dtype (or a merge keeps float32)."""

  format: NF4Format

  def __call__(self, storage: dict[str, jax.Array], shape: tuple[int, ...]) -> jax.Array:
    del shape  # the stored arrays carry the stacked axes that are left
    return self.format.decode(storage, jnp.float32)
