"""LoftQ initialisation (``LoraConfig(init="loftq")`` / ``"loftq_N"``): a quantized base and
adapters that absorb its quantization error, as PEFT's ``peft/utils/loftq_utils.py``.

Starting from ``res = W``, each of ``N`` iterations (default 1, PEFT's ``loftq_iter``)
quantizes ``res`` (``Q``), takes the rank-``r`` SVD ``L·R`` of ``W - deq(Q)`` and sets
``res = W - L·R``. The base becomes the last ``Q`` as an ``NF4Weight`` and the
adapters hold ``L·R``. Two differences from PEFT, both deliberate:

* PEFT assumes ``scaling = alpha / r = 1`` (it stores ``lora_B = L``, ``lora_A = R``);
  jlora divides by the adapter's scale, ``a = L/√s``, ``b = R/√s``, so that
  ``W0 + s·(a⊗b) = deq(Q) + L·R`` for any alpha, rank or rsLoRA.
* PEFT quantizes without double quantization inside the loop and leaves the
  final 4-bit conversion (with whatever settings) to the user; here every
  iteration uses the stored format itself (NF4, blocksize 64, double
  quantization: QLoRA's), so the SVD fits the error of the base actually stored.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from jlora._init_methods import register_init
from jlora._lazy import is_lazy_node
from jlora.quant._format import NF4Format
from jlora.quant._weight import NF4Weight

NAME = r"loftq(_[1-9]\d*)?"


def _iterations(name: str) -> int:
  m = re.fullmatch(NAME, name)
  return int(m.group(1)[1:]) if m and m.group(1) else 1


@functools.lru_cache(maxsize=None)
def _solver(fmt: NF4Format, rank: int, iters: int):
  """Jitted LoftQ for kernels of one format: ``(w, scale) -> (storage, a, b)``."""
  nb = fmt.stack
  in_dims = [fmt.shape[a] for a in fmt.in_axes]
  out_dims = [fmt.shape[a] for a in fmt.out_axes]
  order = (*range(nb), *fmt.in_axes, *fmt.out_axes)

  def to_mats(w):  # (*stack, *in, *out) -> (S, n_in, n_out)
    return jnp.transpose(w, order).reshape(-1, fmt.n_in, fmt.n_out)

  def from_mats(m):
    m = m.reshape(*fmt.stack_shape, *in_dims, *out_dims)
    return jnp.transpose(m, np.argsort(order))

  layer = NF4Format(shape=fmt.shape[nb:], dtype=fmt.dtype, in_axes=tuple(a - nb for a in fmt.in_axes),
                    blocksize=fmt.blocksize, quant_type=fmt.quant_type, double_quant=fmt.double_quant,
                    compute_dtype=fmt.compute_dtype)

  def quantize(res):  # dense (S, n_in, n_out) -> per-layer storage (S, ...) and deq (S, n_in, n_out)
    kernels = from_mats(res).reshape(-1, *fmt.shape[nb:])  # quantized from float32, as PEFT does
    storage = jax.lax.map(layer.encode_layer, kernels)
    deq = jax.vmap(lambda s: layer.decode(s, jnp.float32))(storage)
    return storage, to_mats(deq.reshape(fmt.shape))

  def low_rank(r):  # rank-r SVD factors of (S, n_in, n_out) residuals
    u, s, vh = jnp.linalg.svd(r, full_matrices=False)
    root = jnp.sqrt(s[:, :rank])
    left = u[:, :, :rank] * root[:, None, :]  # (S, n_in, r): x·left is the input side (PEFT's lora_A)
    right = root[:, :, None] * vh[:, :rank, :]  # (S, r, n_out): PEFT's lora_B
    return left, right

  def solve(w, scale):
    target = to_mats(jnp.asarray(w, jnp.float32))

    def step(_, res):
      _, q = quantize(res)
      left, right = low_rank(target - q)
      return target - left @ right

    res = jax.lax.fori_loop(0, iters - 1, step, target)
    storage, q = quantize(res)
    left, right = low_rank(target - q)
    storage = {k: v.reshape(*fmt.stack_shape, *v.shape[1:]) for k, v in storage.items()}
    root_scale = jnp.sqrt(jnp.asarray(scale, jnp.float32))
    a = (left / root_scale).reshape(*fmt.stack_shape, *in_dims, rank)
    b = (right / root_scale).reshape(*fmt.stack_shape, rank, *out_dims)
    return storage, a, b

  return jax.jit(solve)


def loftq_init(key, spec, w0, config):
  """The ``init="loftq[_N]"`` method: ``(NF4 base, {"a", "b"})`` for one targeted kernel."""
  del key  # deterministic, as in PEFT
  where = f"LoraConfig(init={config.init!r})"
  if is_lazy_node(w0):
    raise ValueError(f"{where}: LoftQ needs the dense kernel to fit its quantization error, but the base is "
                     "already quantized; pass the unquantized params to jlora.init (LoftQ quantizes them).")
  if spec.layout.embedding:
    raise ValueError(f"{where}: LoftQ quantizes linear kernels, not embedding tables; exclude the "
                     "embedding from the targets or give its rule another init.")
  if tuple(spec.batch_axes) != tuple(range(len(spec.batch_axes))):
    raise ValueError(f"{where}: stacked axes {spec.batch_axes} of a kernel of shape {spec.shape} must lead it.")
  dtype = jnp.dtype(getattr(w0, "dtype", jnp.float32))
  fmt = NF4Format(shape=spec.shape, dtype=dtype.name, in_axes=spec.in_axes, stack=len(spec.batch_axes))
  storage, a, b = _solver(fmt, spec.rank, _iterations(config.init))(w0, spec.scale)
  return NF4Weight.from_storage(storage, fmt), {"a": a, "b": b}


register_init(NAME, loftq_init, shown="loftq[_N]")
