"""PiSSA/OLoRA residual initialisation against float64 NumPy SVD/QR, the randomized SVD, LoRA
extraction round trips, and LoRA+ against PEFT's create_loraplus_optimizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
import jlora.peft
from helpers import assert_close, oracle_kernel, randomize
from oracles import dora_kernel, plain

KEY = jax.random.key(0)


def _spectrum_matrix(out, inn, decay=0.7, seed=0):
  """A (in, out) kernel with a clear spectral gap, so the top-r subspace is well defined."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(out, out)))
  v, _ = np.linalg.qr(rng.normal(size=(inn, inn)))
  k = min(out, inn)
  s = 3.0 * decay ** np.arange(k)
  return (u[:, :k] * s) @ v[:, :k].T  # torch orientation (out, in)


def test_pissa_factors_are_the_scaled_top_components():
  w_t = _spectrum_matrix(10, 12)
  params = {"w": jnp.asarray(w_t.T, jnp.float32)}  # jlora kernel (in, out)
  lp = jlora.init(KEY, params, jlora.LoraConfig(rank=3, alpha=6, targets="w", init="pissa"))["w"]
  s = 6 / 3
  u, sv, vh = np.linalg.svd(w_t)
  top = (u[:, :3] * sv[:3]) @ vh[:3]  # rank-3 truncation (float64)
  np.testing.assert_allclose(s * (np.asarray(lp.a, np.float64) @ np.asarray(lp.b, np.float64)).T, top, atol=2e-6)
  np.testing.assert_allclose(np.asarray(lp.w0, np.float64).T, w_t - top, atol=2e-6)
  # A·Aᵀ and BᵀB both equal diag(S_r/s) (PEFT splits √S evenly).
  np.testing.assert_allclose(np.asarray(lp.a).T @ np.asarray(lp.a), np.diag(sv[:3] / s), atol=2e-6)
  np.testing.assert_allclose(np.asarray(lp.b) @ np.asarray(lp.b).T, np.diag(sv[:3] / s), atol=2e-6)
  np.testing.assert_array_equal(np.asarray(lp.factors["a0"]), np.asarray(lp.a))


@pytest.mark.parametrize("init", ["pissa_niter_4", "olora"])
def test_randomized_pissa_and_olora_keep_the_model(init):
  # Subspace iteration with q = r (torch.svd_lowrank's) converges as (σ_r+1/σ_r)^(2·niter+1):
  # 0.3^9 ≈ 2e-5 with this spectrum.
  w_t = _spectrum_matrix(9, 14, decay=0.3, seed=1)
  params = {"w": jnp.asarray(w_t.T, jnp.float32)}
  lp = jlora.init(KEY, params, jlora.LoraConfig(rank=3, alpha=3, targets="w", init=init))["w"]
  # Residual + s·BA reproduces W (float32 rounding only).
  np.testing.assert_allclose(oracle_kernel(plain(lp)), w_t.T, atol=2e-6)
  prod = np.asarray(lp.a, np.float64) @ np.asarray(lp.b, np.float64)
  if init == "olora":  # A = R[:r], B = Q[:, :r] of W = QR: B has orthonormal rows in jlora's (r, out)
    np.testing.assert_allclose(np.asarray(lp.b) @ np.asarray(lp.b).T, np.eye(3), atol=2e-6)
    q, r = np.linalg.qr(w_t)
    np.testing.assert_allclose(np.abs(prod.T), np.abs(q[:, :3] @ r[:3]), atol=2e-6)
  else:
    u, sv, vh = np.linalg.svd(w_t)
    np.testing.assert_allclose(prod.T, (u[:, :3] * sv[:3]) @ vh[:3], atol=1e-4)


def test_residual_with_dora_bf16_base_and_errors():
  w = jnp.asarray(_spectrum_matrix(8, 8, seed=2).T, jnp.bfloat16)
  lp = jlora.init(KEY, {"w": w}, jlora.LoraConfig(rank=2, targets="w", init="pissa", dora=True))["w"]
  assert lp.w0.dtype == jnp.bfloat16 and lp.a.dtype == jnp.float32
  assert lp.spec.variant == jlora.variants.Residual(inner=jlora.DoRA())
  assert "variant=residual(dora)" in repr(lp)
  # The magnitude is the norm of W_res + s·BA = W (up to the bf16 rounding of W_res).
  np.testing.assert_allclose(np.asarray(lp.factors["magnitude"]), np.linalg.norm(np.asarray(w, np.float32), axis=0),
                             rtol=1e-2)
  lp = randomize({"w": lp}, KEY)["w"]
  conv = jlora.to_lora({"w": lp}, base={"w": w})["w"]
  assert conv.spec.variant == jlora.DoRA() and conv.spec.rank == 4 and conv.w0 is w
  # DoRA's V = W_res + s·BA equals W + s'·B'A' up to W_res's bf16 rounding.
  assert_close(dora_kernel(conv), dora_kernel(lp), rtol=2e-2, atol=2e-2)
  assert_close(jlora.merge({"w": lp})["w"], dora_kernel(lp), rtol=2e-2, atol=2e-2)
  with pytest.raises(ValueError, match="plain LoRA and DoRA adapters"):
    jlora.init(KEY, {"w": w}, jlora.LoraConfig(rank=2, targets="w", init="pissa", variant=jlora.AdaLoRA()))
  from test_mechanism import quantize_int8

  with pytest.raises(ValueError, match="needs the kernel in floating point"):
    jlora.init(KEY, {"w": quantize_int8(jnp.ones((1, 8, 8)))},
               jlora.LoraConfig(rank=2, targets=[jlora.Rule(pattern="w", layout=jlora.KernelLayout(in_axes=(1,), batch_axes=(0,)))],
                                init="olora"))
  # Residual adapters round-trip through checkpoints (variant found by name, inner included).
  import tempfile

  d = jlora.save_adapter(tempfile.mkdtemp() + "/a", {"w": lp})
  back = jlora.load_adapter(d, {"w": lp.w0})["w"]
  assert back.spec == lp.spec and set(back.factors) == set(lp.factors)


def test_stacked_residual_init_and_conversion():
  w = jnp.asarray(np.stack([_spectrum_matrix(8, 6, seed=i).T for i in range(3)]), jnp.float32)  # (3, in=6, out=8)
  lay = jlora.KernelLayout(in_axes=(1,), batch_axes=(0,))
  cfg = jlora.LoraConfig(rank=2, rslora=True, targets=[jlora.Rule(pattern="w", layout=lay)], init="pissa")
  lp = randomize(jlora.init(KEY, {"w": w}, cfg), KEY)
  np.testing.assert_allclose(oracle_kernel(plain(lp["w"].replace(a=lp["w"].factors["a0"], b=lp["w"].factors["b0"]))),
                             np.asarray(w), atol=2e-6)
  conv = jlora.to_lora(lp, base={"w": w})["w"]
  assert conv.spec.rank == 4 and conv.spec.alpha == pytest.approx(cfg.alpha * np.sqrt(2))  # rsLoRA: α·√2
  assert conv.spec.scale == pytest.approx(lp["w"].spec.scale)
  np.testing.assert_allclose(oracle_kernel(conv), oracle_kernel(plain(lp["w"])), atol=2e-6)


# -- extraction ---------------------------------------------------------------------------------


def test_extract_round_trip_recovers_the_delta():
  params = {"a": {"kernel": jax.random.normal(KEY, (16, 12))}, "b": {"kernel": jax.random.normal(KEY, (3, 12, 10))},
            "bias": jnp.zeros(12)}
  lay = jlora.KernelLayout(in_axes=(1,), batch_axes=(0,))
  cfg = jlora.LoraConfig(rank=3, alpha=5, targets=["a/kernel", jlora.Rule(pattern="b/kernel", rank=2, layout=lay)])
  lp = randomize(jlora.init(KEY, params, cfg), jax.random.key(1))
  tuned = jlora.merge(lp)
  got, report = jlora.extract(params, tuned, rank=3, alpha=5,
                              targets=["a/kernel", jlora.Rule(pattern="b/kernel", rank=2, layout=lay)])
  assert report.rank == {"a/kernel": 3, "b/kernel": 2} and report.method["a/kernel"] == "full"
  for path in ("a/kernel", "b/kernel"):
    assert report.energy[path] == pytest.approx(1.0, abs=1e-5)
  ws, want = jlora._checkpoint.adapter_weights(got), jlora._checkpoint.adapter_weights(lp)
  for p in ws:
    assert ws[p].spec == want[p].spec
    # The same delta, float32 SVD of an O(1) matrix: ~1e-6.
    np.testing.assert_allclose(oracle_kernel(ws[p]), oracle_kernel(want[p]), atol=2e-5)
  assert got["bias"] is params["bias"]
  # A rank below ΔW's keeps the top components' energy, reported per kernel.
  low, rep = jlora.extract(params, tuned, rank=1, targets="a/kernel")
  s = np.linalg.svd(np.asarray(tuned["a"]["kernel"], np.float64) - np.asarray(params["a"]["kernel"]), compute_uv=False)
  assert rep.energy["a/kernel"] == pytest.approx(s[0] ** 2 / np.sum(s ** 2), rel=1e-5)
  # Randomized: the same top components when the spectrum has a gap.
  rnd, rep_r = jlora.extract(params, tuned, rank=3, alpha=5, targets="a/kernel", method="randomized")
  assert rep_r.method["a/kernel"] == "randomized"
  np.testing.assert_allclose(oracle_kernel(rnd["a"]["kernel"]), oracle_kernel(want["a/kernel"]), atol=1e-4)


def test_extract_errors():
  p = {"w": jnp.ones((4, 4))}
  with pytest.raises(ValueError, match="method must be"):
    jlora.extract(p, p, rank=1, targets="w", method="svd")
  with pytest.raises(ValueError, match="has shape"):
    jlora.extract(p, {"w": jnp.ones((4, 5))}, rank=1, targets="w")
  with pytest.raises(ValueError, match="matched no parameter path"):
    jlora.extract(p, p, rank=1, targets="nope")
  with pytest.raises(ValueError, match="rank 5 exceeds"):
    jlora.extract(p, p, rank=5, targets="w")


# -- LoRA+ ----------------------------------------------------------------------------------------


def test_loraplus_labels_and_scaling():
  params = {"w": jnp.ones((4, 6)), "emb": {"embedding": jnp.ones((10, 4))}}
  lp = jlora.init(KEY, params, jlora.LoraConfig(rank=2, targets=["w", ".*/embedding"], dora=True))
  labels = jlora.variants.loraplus_labels(lp)
  assert labels["w"].factors == {"a": "lora_a", "b": "lora_b", "magnitude": "lora_b"}
  assert labels["emb"]["embedding"].factors == {"a": "lora_embedding", "b": "lora_embedding", "magnitude": "lora_b"}
  ada = jlora.init(KEY, params, jlora.LoraConfig(rank=2, targets="w", variant=jlora.AdaLoRA()))
  assert jlora.variants.loraplus_labels(ada)["w"].factors == {"a": "lora_a", "b": "lora_b", "e": "lora_a",
                                                              "rank_mask": "frozen"}
  adapters, _ = jlora.split(lp)
  g = jax.tree.map(jnp.ones_like, adapters)
  plain_tx = jlora.optimizer(optax.sgd(0.1), adapters)
  plus = jlora.optimizer(optax.sgd(0.1), adapters, loraplus_ratio=16.0, loraplus_embedding_ratio=0.5)
  u0, _ = plain_tx.update(g, plain_tx.init(adapters), adapters)
  u1, _ = plus.update(g, plus.init(adapters), adapters)
  np.testing.assert_array_equal(u1["w"].a, u0["w"].a)
  np.testing.assert_array_equal(u1["w"].b, 16 * u0["w"].b)
  np.testing.assert_array_equal(u1["w"].factors["magnitude"], 16 * u0["w"].factors["magnitude"])
  np.testing.assert_array_equal(u1["emb"]["embedding"].b, 0.5 * u0["emb"]["embedding"].b)
  np.testing.assert_array_equal(u1["emb"]["embedding"].factors["magnitude"],
                                16 * u0["emb"]["embedding"].factors["magnitude"])
  with pytest.raises(ValueError, match="LoRA\\+ ratio must be a number > 0"):
    jlora.optimizer(optax.sgd(0.1), adapters, loraplus_ratio=0)


def test_loraplus_matches_peft_create_loraplus_optimizer(tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  from peft.optimizers import create_loraplus_optimizer
  from hf_models import IDS, hf_base, lm_loss, torch_model

  loaded, _ = hf_base("llama", native=False)
  cfg = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "embed_tokens"],
                        init_lora_weights="gaussian")
  pm = peft.get_peft_model(torch_model("llama"), cfg)
  with torch.no_grad():  # non-zero B so that A's gradient is not zero either
    for n, p in pm.named_parameters():
      if "lora_B" in n or "lora_embedding_A" in n:
        p.normal_(0, 0.1)
  pm.save_pretrained(str(tmp_path / "init"), save_embedding_layers=False)
  lp = jlora.peft.load(str(tmp_path / "init"), loaded.params, module_map=loaded.module_map, layout=loaded.layout)
  # SGD: updates proportional to the gradients, which agree to ~1e-6 between PyTorch and XLA, so
  # the parameters must agree tightly (Adam would amplify the rounding of near-zero gradients).
  lr, ratio, lr_emb = 0.05, 16.0, 0.5
  opt = create_loraplus_optimizer(pm, torch.optim.SGD, lr=lr, loraplus_lr_ratio=ratio, loraplus_lr_embedding=lr_emb)
  pm.train()
  ids = torch.tensor(IDS)
  for _ in range(3):
    pm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
  adapters, frozen = jlora.split(lp)
  tx = jlora.optimizer(optax.sgd(lr), adapters, loraplus_ratio=ratio,
                       loraplus_embedding_ratio=lr_emb / lr)
  state = tx.init(adapters)
  grad = jax.jit(jax.grad(lambda a: lm_loss(loaded, jlora.combine(a, frozen))))
  for _ in range(3):
    u, state = tx.update(grad(adapters), state, adapters)
    adapters = optax.apply_updates(adapters, u)
  pm.eval().save_pretrained(str(tmp_path / "trained"), save_embedding_layers=False)
  want = jlora._checkpoint.adapter_weights(jlora.peft.load(str(tmp_path / "trained"), loaded.params, module_map=loaded.module_map, layout=loaded.layout))
  got = jlora._checkpoint.adapter_weights(adapters)
  init = jlora._checkpoint.adapter_weights(lp)
  for p in got:
    for n in got[p].factors:
      moved = np.abs(np.asarray(want[p].factors[n]) - np.asarray(init[p].factors[n])).max()
      assert moved > 0, (p, n)
      np.testing.assert_allclose(np.asarray(got[p].factors[n]), np.asarray(want[p].factors[n]),
                                 rtol=1e-4, atol=1e-6, err_msg=f"{p} {n}")
