"""bitsandbytes as a reference that is right on every x86-64 CPU (tests only).

bitsandbytes 0.50.2 has two CPU paths for its 4-bit weights:

* a *generic* one in Python (``bitsandbytes/backends/default/ops.py``): decode each code through
  the 16-value code book and multiply by its block's absmax, over the flat storage order;
* a *native* one in C (``backends/cpu/ops.py``), registered for PyTorch's CPU dispatch key, plus,
  on CPUs with AVX512-BF16 (AMD EPYC Zen 4, Intel Sapphire Rapids), a repacking of every
  ``Linear4bit`` in eval mode into a fused bf16 kernel's layout.

Measured on an AMD EPYC with AVX512-BF16: the native decode is wrong wherever a 4-bit block
straddles two rows of the weight (it decodes row by row), ``dequantize_4bit`` on repacked weights
returns garbage, some shapes crash in the repacking, and the fused kernel computes in bf16 whatever
compute dtype was asked for. bitsandbytes' *quantization* (the codes and absmax it writes) is the
same on every CPU.

Importing this module makes the reference the generic path on every CPU, by construction:

* the CPU kernel of ``bitsandbytes::dequantize_4bit`` is bitsandbytes' own generic decode (every
  4-bit matmul of ``Linear4bit`` outside the repacked path decodes through this op);
* ``Linear4bit`` never repacks (its AVX512-BF16 probe answers False), so the fused bf16 kernel is
  never used.

``NATIVE_DISAGREEMENT`` is what the native decode gets wrong on this CPU, measured before the
routing; the suite reports it (``tests/quant/test_bnb_reference.py``).
"""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")

import bitsandbytes.functional as F  # noqa: E402
import bitsandbytes.nn.modules as _modules  # noqa: E402
from bitsandbytes.backends.default import ops as _generic_ops  # noqa: E402
from bitsandbytes.backends.utils import _get_4bit_code  # noqa: E402

HAS_AVX512BF16 = bool(F.has_avx512bf16())


def generic_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
  """bitsandbytes' generic 4-bit decode (the ``default`` backend's), for any storage dtype."""
  if A.dtype != torch.uint8:
    A = A.view(torch.uint8)
  code = _get_4bit_code(quant_type, A.device)
  return _generic_ops._dequantize_4bit_compute(A.reshape(-1), absmax, code, blocksize, shape, dtype)


def _route_to_generic() -> None:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": that is the point
    torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", generic_dequantize_4bit)
  _modules.has_avx512bf16 = lambda: False  # Linear4bit reads it in __init__: no repacking


def _measure_native(rows: int = 32, cols: int = 48, blocksize: int = 64) -> tuple[int, int, float]:
  """How many of a weight's elements bitsandbytes' CPU dispatch decodes differently from its generic path.

  Quantizes a ``[rows, cols]`` weight whose blocks straddle rows (``cols`` is not a multiple of
  ``blocksize``) and decodes it with what ``dequantize_4bit`` dispatches to on this CPU (the native
  kernel where the C library loaded) and with the generic decode. Returns ``(differing, total,
  max_abs_difference)``. Must run before ``_route_to_generic``.
  """
  g = torch.Generator().manual_seed(0)
  w = torch.randn(rows, cols, generator=g)
  q, st = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
  args = (q, st.absmax, st.blocksize, st.quant_type, list(st.shape), torch.float32)
  with torch.no_grad():
    want = generic_dequantize_4bit(*args)
    got = torch.ops.bitsandbytes.dequantize_4bit.default(*args)
  diff = got != want
  return int(diff.sum()), diff.numel(), float((got - want).abs().max())


# (differing elements, total, max |difference|) of the native decode on this CPU, measured before routing.
NATIVE_DISAGREEMENT = _measure_native()
_route_to_generic()
