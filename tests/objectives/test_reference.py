"""The reference pass: the wrapped model with its adapters off, under stop_gradient, with no activations kept."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import objectives as ob
from objective_data import preference_batch, preference_records

CHUNK = 4


@pytest.fixture(scope="module")
def zero_b(tiny):
  """The test adapter with B = 0 (A random): the policy is the base model."""
  return jax.tree.map(lambda w: w.replace(b=jnp.zeros_like(w.b)) if isinstance(w, jlora.LoraWeight) else w,
                      tiny.lora, is_leaf=lambda w: isinstance(w, jlora.LoraWeight))


@pytest.fixture(scope="module")
def batch():
  return {k: jnp.asarray(v) for k, v in preference_batch(preference_records(seed=2, pairs=3)).items()}


def test_zero_b_gives_every_reward_exactly_zero(tiny, zero_b, batch):
  @jax.jit
  def rewards(lora):
    p = ob.preference_logps(tiny.model, lora, batch, chunk_size=CHUNK)
    out = {}
    for lt in ob.DPO_LOSS_TYPES:
      out[lt] = ob.dpo_loss(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, loss_type=lt,
                            label_smoothing=0.1 if lt == "robust" else 0.0, chosen_counts=p.chosen_counts,
                            rejected_counts=p.rejected_counts)
    return p, out

  p, out = rewards(zero_b)
  assert np.asarray(p.chosen).min() < -1.0  # real log-probs, not zeros
  np.testing.assert_array_equal(p.chosen, p.ref_chosen)  # bitwise
  np.testing.assert_array_equal(p.rejected, p.ref_rejected)
  for lt, (loss, m) in out.items():
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
      assert float(m[k]) == 0.0, (lt, k)
  assert float(out["sigmoid"][0]) == float(-jax.nn.log_sigmoid(0.0))  # log 2, as at Δ = 0
  # A random adapter moves them (the test can fail).
  p, out = rewards(tiny.lora)
  assert np.abs(np.asarray(p.chosen - p.ref_chosen)).min() > 1e-3
  assert float(out["sigmoid"][1]["rewards/margins"]) != 0.0


def test_zero_b_in_a_train_step(tiny, zero_b, batch):
  adapters, frozen = jlora.split(zero_b)

  def loss(a):
    p = ob.preference_logps(tiny.model, jlora.combine(a, frozen), batch, chunk_size=CHUNK)
    return ob.dpo_loss(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected)[0], p

  (_, p), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(adapters)
  # Under differentiation XLA fuses the model's forward pass differently (it also outputs the
  # backward pass's residuals), so the policy's log-probs may differ from the reference's in
  # the last float32 bits: up to ~1 ulp per layer of the hidden states, also without any adapter
  # (a plain model's forward with and without jax.grad). Exact equality holds in forward passes
  # (the test above).
  for got, ref in ((p.chosen, p.ref_chosen), (p.rejected, p.ref_rejected)):
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))
  assert any(np.abs(np.asarray(w.b)).max() > 0 for w in jlora._checkpoint.adapter_weights(grads).values())


def _float_residual_bytes(vjp, exclude_shapes) -> int:
  return sum(r.size * r.dtype.itemsize for r in jax.tree.leaves(vjp)
             if hasattr(r, "dtype") and jnp.issubdtype(r.dtype, jnp.floating) and tuple(r.shape) not in exclude_shapes)


def test_the_reference_pass_keeps_no_activations(tiny, batch):
  """DPO's residuals (what the forward pass keeps for the backward) are SFT's over the same 2B sequences."""
  adapters, frozen = jlora.split(tiny.lora)
  params_shapes = {tuple(x.shape) for x in jax.tree.leaves(tiny.lora)}

  def dpo(a):
    p = ob.preference_logps(tiny.model, jlora.combine(a, frozen), batch, chunk_size=CHUNK)
    return ob.dpo_loss(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected)[0]

  def sft(a):
    tok = ob.model_token_logprobs(tiny.model, jlora.combine(a, frozen), batch["input_ids"], batch["completion_mask"],
                                  attention_mask=batch["attention_mask"], chunk_size=CHUNK)
    return -jnp.sum(tok)

  def residuals(f):  # abstractly: no compilation
    return _float_residual_bytes(jax.eval_shape(lambda a: jax.vjp(f, a)[1], adapters), params_shapes)

  sft_bytes, dpo_bytes = residuals(sft), residuals(dpo)
  print(f"\nresidual bytes: SFT {sft_bytes}, DPO {dpo_bytes}")
  assert sft_bytes > 0
  # DPO keeps at most a few scalars per pair more (its loss's own residuals): no second model's activations.
  assert dpo_bytes - sft_bytes <= 64 * batch["input_ids"].shape[0], (dpo_bytes, sft_bytes)


def test_batch_refusals():
  ids = jnp.zeros((4, 5), jnp.int32)
  batch = {"input_ids": ids, "attention_mask": ids, "completion_mask": ids}
  with pytest.raises(ValueError, match=r"preference_logps: batch lacks \['completion_mask'\]"):
    ob.preference_logps(None, {}, {"input_ids": ids, "attention_mask": ids})
  with pytest.raises(ValueError, match="must all be \\(rows, length\\)"):
    ob.preference_logps(None, {}, {**batch, "attention_mask": ids[:, :3]})
  with pytest.raises(ValueError, match="B chosen rows and then B rejected rows, got 3 rows"):
    ob.preference_logps(None, {}, {k: v[:3] for k, v in batch.items()})
  with pytest.raises(ValueError, match=r"kto_logps: batch lacks \['KL_input_ids', 'KL_attention_mask'"):
    ob.kto_logps(None, {}, batch)
  kl = {"KL_" + k: v[:2] for k, v in batch.items()}
  with pytest.raises(ValueError, match="one KL sequence per example is needed, got 4 rows and 2 KL rows"):
    ob.kto_logps(None, {}, {**batch, **kl})
