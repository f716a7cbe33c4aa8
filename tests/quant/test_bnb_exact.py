"""jlora's 4-bit quantizer against bitsandbytes 0.50 on CPU: the same bytes, the same decode."""

from __future__ import annotations

import fractions

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.quant import _blockwise, _codebook

torch = pytest.importorskip("torch")
from bnb_reference import F  # noqa: E402  (bitsandbytes on its generic CPU path: right on every CPU)

TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (in, out) JAX kernels: in a multiple of 64 (row layout), in not a multiple of 64 with a partial
# last block (70·33 = 2310 = 36·64 + 6: blocks straddle rows), and an odd element count (7·9).
SHAPES = [(128, 96), (70, 33), (7, 9)]


def kernel(shape, dtype, seed=0):
  """A Gaussian kernel whose first 64 torch-layout elements (column 0's first 64 rows) are zero."""
  w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  w[:64, 0] = 0.0  # torch row 0 starts with 64 zeros: an all-zero block when in >= 64
  if shape[0] < 64:
    w[:, :] = np.where(np.arange(w.size).reshape(shape) % 5 == 0, 0.0, w)
  return jnp.asarray(w).astype(dtype)


def bnb_quantize(k, double_quant, quant_type="nf4", blocksize=64):
  """bitsandbytes on the PyTorch weight [out, in] = k.T, in k's dtype."""
  w = torch.tensor(np.asarray(k.astype(jnp.float32)).T.copy()).to(TORCH[jnp.dtype(k.dtype).name])
  return F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)


def test_code_books_are_bitsandbytes():
  for qt in ("nf4", "fp4"):
    np.testing.assert_array_equal(_codebook.code(qt), F.get_4bit_type(qt, device="cpu").numpy())
  # bit for bit: create_dynamic_map's float32 linspace and products are reproduced exactly
  np.testing.assert_array_equal(_codebook.DYNAMIC.view(np.uint32), F.create_dynamic_map().numpy().view(np.uint32))


# NF4 for every dtype and layout case; FP4 and blocksize 32 once each (one compile per format).
EXACT_CASES = [(dt, "nf4", 64) for dt in ("float32", "bfloat16", "float16")] + [("float32", "fp4", 64),
                                                                               ("bfloat16", "nf4", 32)]


@pytest.mark.parametrize("dtype,quant_type,blocksize", EXACT_CASES)
def test_single_level_is_bit_exact(dtype, quant_type, blocksize):
  for shape in SHAPES:
    k = kernel(shape, dtype)
    packed, st = bnb_quantize(k, False, quant_type, blocksize)
    node = jlora.quantize({"w": k}, targets="w", double_quant=False, quant_type=quant_type, blocksize=blocksize)["w"]
    np.testing.assert_array_equal(np.asarray(node.packed).reshape(-1), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(node.absmax).reshape(-1).view(np.uint32),
                                  st.absmax.numpy().view(np.uint32))
    want = F.dequantize_4bit(packed, st)  # bitsandbytes' own decode, in the original dtype
    got = node.dequantize()
    assert got.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), want.float().numpy().T)
    if shape[0] >= 64:  # the all-zero block: absmax 0, decoded exactly 0
      assert float(node.absmax.reshape(-1)[0]) == 0.0 and not np.asarray(got[:64, 0].astype(jnp.float32)).any()


def test_midpoint_ties_go_down():
  mid, _ = _codebook.bounds("nf4")
  vals = np.concatenate([mid, -mid, np.nextafter(mid, 2), np.nextafter(mid, -2), [1.0]]).astype(np.float32)
  k = jnp.asarray(vals.reshape(61, 1))  # one partial block (scaled by division)
  k2 = jnp.asarray(np.concatenate([vals, [0.5, 0.25, -1.0]]).astype(np.float32).reshape(64, 1))  # one full block
  for w in (k, k2):
    packed, _ = bnb_quantize(w, False)
    node = jlora.quantize({"w": w}, targets="w", double_quant=False)["w"]
    np.testing.assert_array_equal(np.asarray(node.packed).reshape(-1), packed.numpy().reshape(-1))


def test_dynamic_8bit_matches_the_cpu_lookup_table():
  rng = np.random.default_rng(1)
  # Random values, values on and next to the 65,536 cell edges and every code's neighbours.
  edges = (np.arange(65536, dtype=np.float64) - 0.5) / 65535 * 2 - 1
  near = np.concatenate([edges, np.nextafter(edges.astype(np.float32), 2), _codebook.DYNAMIC,
                         (_codebook.DYNAMIC[1:] + _codebook.DYNAMIC[:-1]) / 2]).astype(np.float32)
  x = np.concatenate([[1.0], np.clip(near, -1, 1), rng.uniform(-1, 1, 60_000), rng.standard_normal(3000) * 1e-3,
                      np.zeros(256)]).astype(np.float32)
  x = x[: len(x) // 256 * 256 + 100]  # a partial last block; the zero block sits before it
  codes, absmax = F.quantize_blockwise(torch.tensor(x), blocksize=256)
  got_codes, got_absmax = jax.jit(_blockwise.quantize_dynamic)(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(got_absmax), absmax.absmax.numpy())
  np.testing.assert_array_equal(np.asarray(got_codes), codes.numpy())
  # ...which is not the nearest code (the CUDA rounding) in a few cells: we match the table.
  nearest = np.abs(x[:, None] / np.repeat(np.maximum(absmax.absmax.numpy(), 1e-30), 256)[: len(x), None]
                   - _codebook.DYNAMIC[None, :]).argmin(1)
  assert (nearest != codes.numpy()).sum() > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_double_quant_within_one_step(dtype):
  # 256·72 = 18,432 blocks of 64 → 72 nested blocks.
  k = kernel((512, 2304), dtype, seed=2)
  packed, st = bnb_quantize(k, True)
  node = jlora.quantize({"w": k}, targets="w")["w"]
  np.testing.assert_array_equal(np.asarray(node.packed).reshape(-1), packed.numpy().reshape(-1))
  # The offset is the correctly rounded mean of the absmaxes; PyTorch's float32 cascade sum (its
  # order depends on the SIMD width and thread count) can be one ulp off it.
  assert abs(float(node.nested_offset) - st.offset.item()) <= np.spacing(np.float32(st.offset.item()))
  nested = np.asarray(node.nested_absmax)
  np.testing.assert_allclose(nested, st.state2.absmax.numpy(), rtol=2e-7, atol=0)
  steps = np.abs(np.asarray(node.absmax).reshape(-1).astype(int) - st.absmax.numpy().astype(int))
  assert steps.max() <= 1 and steps.mean() < 1e-3, (steps.max(), steps.mean())
  # Given bitsandbytes' own offset, the 8-bit codes are identical.
  a = np.asarray(_blockwise.quantize_4bit(k.T.reshape(-1), 64)[1])
  codes, _ = _blockwise.quantize_dynamic(jnp.asarray(a - np.float32(st.offset.item())))
  np.testing.assert_array_equal(np.asarray(codes), st.absmax.numpy())
  # Decoded weights: bitsandbytes' decode of our bytes equals ours.
  st.absmax = torch.tensor(np.asarray(node.absmax).reshape(-1))
  st.offset = torch.tensor(float(node.nested_offset))
  st.state2.absmax = torch.tensor(nested)
  want = F.dequantize_4bit(packed, st).float().numpy().T
  np.testing.assert_array_equal(np.asarray(node.dequantize().astype(jnp.float32)), want)


def test_storage_bits_from_bytes():
  p = {"a": jnp.zeros((1024, 1024), jnp.bfloat16), "b": jnp.zeros((4096, 512), jnp.bfloat16)}
  q = jlora.quantize(p, targets=".*")
  nbytes = sum(x.nbytes for x in jax.tree.leaves(q))  # the children are exactly the stored arrays
  bits = 8 * nbytes / (1024 * 1024 + 4096 * 512)
  assert bits <= 4.13 and bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)
  assert jlora.quant.storage_bits(q) == pytest.approx(bits)
  single = jlora.quantize(p, targets=".*", double_quant=False)
  assert jlora.quant.storage_bits(single) == pytest.approx(4.5, abs=1e-6)
  assert jlora.count(q).frozen_bytes == nbytes


def _exact_mean_f32(x) -> np.float32:
  """The float32 nearest the exact mean of float32 values (fractions: no rounding until the end)."""
  x = np.asarray(x, np.float32)
  mean = sum((fractions.Fraction(float(v)) for v in x), fractions.Fraction(0)) / len(x)
  f = np.float32(float(mean))
  near = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
  return min(near, key=lambda c: abs(fractions.Fraction(float(c)) - mean))


def test_double_quant_offset_is_the_correctly_rounded_mean_and_what_the_codes_used():
  """On 64 random layers: the stored offset is the float32 nearest the exact mean of the block absmaxes
  (under jit, XLA once turned / n into * (1/n): 1 ulp off in a third of the layers), and the nested
  codes are those of absmax - (that stored offset) (it once recomputed the offset for each use)."""
  from jlora.quant import _blockwise

  rng = np.random.default_rng(0)
  for i in range(64):
    w = (rng.standard_normal((256, 96)) * rng.uniform(0.01, 1.0)).astype(np.float32)
    q = jlora.quantize({"w": jnp.asarray(w)}, targets="w")["w"]
    _, absmax = _blockwise.quantize_4bit(jnp.asarray(w.T).reshape(-1), 64, "nf4")  # torch [out, in] order
    offset = np.float32(q.nested_offset)
    assert offset == _exact_mean_f32(absmax), i
    codes, nested = _blockwise.quantize_dynamic(jnp.asarray(absmax) - offset)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(q.absmax).reshape(-1), err_msg=str(i))
    np.testing.assert_array_equal(np.asarray(nested), np.asarray(q.nested_absmax).reshape(-1), err_msg=str(i))
