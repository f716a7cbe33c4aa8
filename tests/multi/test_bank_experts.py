"""Banks of adapters on routed experts: every row equals its adapter alone, values and gradients.

A sorted-dispatch MoE permutes (and repeats) the token rows before its ``ragged_dot``s; the
bank's consumer follows each sorted row back to the example it came from
(``jlora._apply.rows``). The dense-dispatch twin flattens the batch to ``(B·S, d)`` rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from experts.moe_fns import adapters, decoder, experts_sorted, init_params, inputs
from helpers import assert_close

# float32, outputs of magnitude ~50: the single adapter's custom VJP (masked grouped matmuls on CPU) and the
# bank's one-hot path sum in different orders.
F32 = dict(rtol=2e-5, atol=2e-4)
TARGETS = [(2, r"layers/mlp/experts/.*/kernel"), (4, r"layers/(mlp/experts/.*|self_attn/q_proj)/kernel"),
           (3, r"layers/mlp/experts/down_proj/kernel")]


def _bank_setup():
  p = init_params(0)
  x = inputs(1, (3, 4, 16))
  ads = [adapters(10 + i, p, jlora.LoraConfig(rank=r, alpha=2.0 * r, targets=t)) for i, (r, t) in enumerate(TARGETS)]
  return p, x, ads


_SINGLES: dict = {}


def _alone(dispatch, p, x, ads):
  """Each adapter alone, and the base (-1), on the whole batch (computed once per dispatch)."""
  if dispatch not in _SINGLES:
    f = lambda q, x: decoder(q, x, dispatch=dispatch)
    _SINGLES[dispatch] = {-1: jax.jit(f)(p, x), **{i: jax.jit(jlora.wrap(f))(a, x) for i, a in enumerate(ads)}}
  return _SINGLES[dispatch]


@pytest.mark.parametrize("strategy,dispatch", [("auto", "sorted"), ("gather", "sorted"), ("ragged", "sorted"),
                                               ("auto", "dense")])
def test_mixed_bank_on_experts_equals_each_adapter_alone(strategy, dispatch):
  p, x, ads = _bank_setup()
  f = lambda q, x: decoder(q, x, dispatch=dispatch)
  bank = jlora.stack(ads, strategy=strategy)
  outs = _alone(dispatch, p, x, ads)
  # One adapter per row ((B,) ids) ...
  ids = jnp.array([2, -1, 0])
  got = jax.jit(jlora.wrap(f))(bank, x, adapter_ids=ids)
  for row, i in enumerate(ids.tolist()):
    assert_close(got[row], outs[i][row], **F32)
  if strategy != "auto":
    return
  # ... and per token ((B, S) ids): a token's expert rows use its own slot.
  tok = jnp.array([[0, 1, 2, -1], [1, 1, 0, 2], [-1, 2, 2, 0]])
  got = jax.jit(jlora.wrap(f))(bank, x, adapter_ids=tok)
  # No layer of this model mixes tokens, so each token equals the model with its own adapter.
  for b in range(3):
    for s in range(4):
      assert_close(got[b, s], outs[int(tok[b, s])][b, s], **F32)


def test_bank_gradients_on_experts_are_each_adapters_own():
  p, x, ads = _bank_setup()
  bank = jlora.stack(ads)
  ids = jnp.array([1, 0, 1])
  trainable, frozen = jlora.split(bank)
  loss = lambda a: jnp.mean(jnp.square(jlora.wrap(decoder)(jlora.combine(a, frozen), x, adapter_ids=ids)))
  g = jax.jit(jax.grad(loss))(trainable)["layers"]["mlp"]["experts"]["up_proj"]["kernel"]
  for k in (0, 1):
    rows = np.flatnonzero(np.asarray(ids) == k)
    a_k, fr_k = jlora.split(ads[k])
    # (the mean over all the bank's rows: these rows' share of it)
    gk = jax.grad(lambda a: jnp.sum(jnp.square(jlora.wrap(decoder)(jlora.combine(a, fr_k), x[rows]))) / x.size)(a_k)
    want = gk["layers"]["mlp"]["experts"]["up_proj"]["kernel"]
    r = want.spec.rank
    tol = dict(rtol=1e-4, atol=1e-5 * float(np.abs(np.asarray(want.a)).max()))
    # bank factors: a (L, E, slot, in, r), b (L, E, slot, r, out)
    assert_close(g.a[:, :, k, :, :r], want.a, **tol)
    assert_close(g.b[:, :, k, :r], want.b, **tol)
  assert not np.any(np.asarray(g.a[:, :, 2])), "a slot no row uses gets no gradient"


def test_rows_that_cannot_be_followed_back_are_an_error():
  p, x, ads = _bank_setup()
  bank = jlora.stack(ads)

  def flat_mix(q, x):  # the MoE input is a running sum over tokens: its rows mix the examples
    t = jnp.cumsum(x.reshape(-1, x.shape[-1]), axis=0)
    mlp = jax.tree.map(lambda w: w[0], q["layers"]["mlp"])
    return experts_sorted(t, mlp, 2)

  with pytest.raises(jlora.LoraApplyError, match=r"ragged_dot whose input rows cannot be followed back to the batch"):
    jax.eval_shape(lambda b, x: jlora.wrap(flat_mix)(b, x, adapter_ids=jnp.array([0, 1, 2])), bank, x)
