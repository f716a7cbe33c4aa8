"""The bitsandbytes reference itself: its routed decode is the code-book decode on this CPU, and the
suite says when bitsandbytes' native CPU kernel would have disagreed (see ``tests/bnb_reference.py``)."""

from __future__ import annotations

import platform
import warnings

import numpy as np
import pytest

from bnb_reference import F, HAS_AVX512BF16, NATIVE_DISAGREEMENT, bnb, torch  # noqa: E402

NF4 = np.asarray(F.get_4bit_type("nf4", device="cpu"), np.float64)


def _numpy_decode(packed: np.ndarray, absmax: np.ndarray, blocksize: int, shape) -> np.ndarray:
  """The NF4 format from its definition: flat storage order, first element in the high nibble."""
  codes = np.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)[: int(np.prod(shape))]
  scale = np.repeat(absmax.astype(np.float64), blocksize)[: codes.size]
  return (NF4[codes] * scale).reshape(shape)


@pytest.mark.parametrize("shape", [(32, 48), (96, 160), (352, 64), (7, 33)])
@pytest.mark.parametrize("nested", [False, True])
def test_reference_decode_is_the_code_book_decode(shape, nested):
  # shapes whose 64-blocks straddle rows, the bundled base's 352-wide MLP and an odd width
  w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
  q, st = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
  absmax = (F.dequantize_blockwise(st.absmax, st.state2) + st.offset) if nested else st.absmax
  want = _numpy_decode(q.numpy().reshape(-1), absmax.numpy(), 64, shape)
  got = F.dequantize_4bit(q, st).numpy()
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want.astype(np.float32))


def test_linear4bit_in_eval_computes_with_the_decoded_weight_in_float32():
  # On AVX512-BF16 CPUs bitsandbytes would repack the weight for a bf16 kernel here (eval, no grad).
  lin = bnb.nn.Linear4bit(48, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
  lin.weight = bnb.nn.Params4bit(torch.randn(32, 48, generator=torch.Generator().manual_seed(2)),
                                 requires_grad=False, quant_type="nf4")
  lin = lin.to("cpu").eval()
  x = torch.randn(5, 48, generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    y = lin(x)
  assert not getattr(lin.weight.quant_state, "packing_format_for_cpu", False)
  deq = F.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
  np.testing.assert_allclose(y.numpy(), (x @ deq.T).numpy(), rtol=1e-6, atol=1e-6)  # float32 summation order


def test_native_kernel_disagreement_is_reported():
  differing, total, max_diff = NATIVE_DISAGREEMENT
  assert total == 32 * 48 and 0 <= differing <= total
  if differing:
    warnings.warn(
        f"bitsandbytes {bnb.__version__}'s native CPU 4-bit decode disagrees with its own generic decode on "
        f"this CPU ({platform.processor() or platform.machine()}, AVX512-BF16: {HAS_AVX512BF16}): "
        f"{differing} of {total} elements of a weight whose blocks straddle rows, max |difference| "
        f"{max_diff:.3g}. The bitsandbytes reference checks use the generic decode (tests/bnb_reference.py).",
        UserWarning, stacklevel=1)
  else:
    assert max_diff == 0.0
