"""LoftQ initialisation against PEFT's algorithm on bitsandbytes, and its purpose: a smaller error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.quant import _loftq
from jlora.quant._format import NF4Format

torch = pytest.importorskip("torch")
from bnb_reference import bnb  # noqa: E402  (bitsandbytes on its generic CPU path: right on every CPU)
loftq_utils = pytest.importorskip("peft.utils.loftq_utils")


def peft_loftq(w_torch, rank, iters):
  """``peft.utils.loftq_utils.loftq_init`` with its device fixed to the CPU (PEFT hard-codes a GPU):
  the same loop around bitsandbytes' NF4 and PEFT's own ``_low_rank_decomposition``."""
  res = w_torch.clone()
  for i in range(iters):
    q = bnb.nn.Params4bit(res, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
    deq = bnb.functional.dequantize_4bit(q.data, q.quant_state)
    out = loftq_utils._low_rank_decomposition(w_torch - deq, reduced_rank=rank)
    if i + 1 == iters:
      break
    res = w_torch - out["L"] @ out["R"]
  # dequantized base, its packed codes, lora_A (r, in), lora_B (out, r)
  return deq, q.data.numpy().reshape(-1), out["R"], out["L"]


@pytest.mark.parametrize("iters", [1, 3])
def test_matches_peft_loftq(iters):
  rng = np.random.default_rng(0)
  w = (rng.standard_normal((96, 160)) * 0.05).astype(np.float32)  # torch [out, in]
  deq, packed, lora_a, lora_b = peft_loftq(torch.tensor(w), 8, iters)
  # PEFT's setting (no double quantization, scale 1) on the JAX kernel [in, out] = w.T
  fmt = NF4Format(shape=(160, 96), dtype="float32", in_axes=(0,), double_quant=False)
  storage, a, b = _loftq._solver(fmt, 8, iters)(jnp.asarray(w.T), 1.0)
  node = jlora.NF4Weight.from_storage(storage, fmt)
  got_q = np.asarray(node.dequantize())
  if iters == 1:  # the first quantization is of W itself: bit-exact
    np.testing.assert_array_equal(got_q, deq.numpy().T)
  else:  # later residuals differ by float32 matmul rounding: the same 4-bit codes almost everywhere
    codes = lambda b: np.stack([b >> 4, b & 15], -1).reshape(-1)
    assert np.mean(codes(np.asarray(node.packed).reshape(-1)) != codes(packed)) < 2e-3
    np.testing.assert_allclose(got_q, deq.numpy().T, rtol=1e-5, atol=1e-6)
  # L·R: two float32 SVDs (LAPACK through PyTorch and through XLA) of the same residual.
  want = (lora_b @ lora_a).numpy().T
  got = np.asarray(a @ b)
  assert np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want)


def test_loftq_error_below_plain_qlora_for_any_scale():
  k = jax.random.key(0)
  p = {"layers": {"w": jax.random.normal(k, (2, 128, 96)) * 0.05}}
  layout = {"layers/w": jlora.KernelLayout(in_axes=(1,), batch_axes=(0,))}
  plain = jlora.dequantize(jlora.quantize(p, targets=".*", layout=layout))
  errors = {}
  for init in ("loftq", "loftq_4"):
    for alpha, rslora in ((16.0, False), (4.0, True)):
      cfg = jlora.LoraConfig(rank=8, alpha=alpha, rslora=rslora, targets=".*", init=init)
      lp = jlora.init(jax.random.key(1), p, cfg, layout=layout)
      assert isinstance(lp["layers"]["w"].w0, jlora.NF4Weight) and lp["layers"]["w"].w0.format.double_quant
      merged = jlora.merge(lp)  # deq(Q) + s·(A⊗B), whatever the scale s
      w, got, base = p["layers"]["w"], merged["layers"]["w"], plain["layers"]["w"]
      err, qerr = float(jnp.linalg.norm(w - got)), float(jnp.linalg.norm(w - base))
      assert err < 0.95 * qerr, (init, alpha, err, qerr)
      errors.setdefault(init, set()).add(round(err, 4))
  for init, errs in errors.items():
    assert len(errs) == 1, (init, errs)  # the scale is divided out: same approximation for every alpha
  assert min(errors["loftq_4"]) < min(errors["loftq"])


def test_loftq_refusals():
  with pytest.raises(ValueError, match=r"LoftQ needs the dense kernel"):
    q = jlora.quantize({"w": jnp.ones((64, 8))}, targets="w")
    jlora.init(jax.random.key(0), q, jlora.LoraConfig(rank=2, targets="w", init="loftq"))
  with pytest.raises(ValueError, match=r"not embedding tables"):
    jlora.init(jax.random.key(0), {"embedding": jnp.ones((64, 8))}, jlora.LoraConfig(rank=2, targets="embedding",
                                                                                   init="loftq"))
  assert jlora.LoraConfig(targets="w", init="loftq_3").init == "loftq_3"
  with pytest.raises(ValueError, match=r"LoraConfig.init must be one of .*loftq\[_N\]"):
    jlora.LoraConfig(targets="w", init="loftq_0")
