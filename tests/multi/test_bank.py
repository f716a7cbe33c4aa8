"""Banks of adapters served per example: every row against a dense float64 oracle of its own adapter.

The reference for row ``i`` is the unwrapped model run on that row alone with the dense kernel
``W0 + s_i·A_i B_i`` (NumPy float64, cast to float32) of adapter ``ids[i]``, or the base for -1;
gradients are compared with autodiff of the same dense form restricted to each adapter's rows.
"""

from __future__ import annotations

import dataclasses
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
import jlora.multi
from helpers import assert_close, oracle_params, randomize

transformers = pytest.importorskip("transformers")

STRATEGIES = ("gather", "onehot", "ragged")
# float32 forward vs a float64-built dense kernel run in float32: the low-rank path sums in
# another order. With these adapter magnitudes a *plain* single adapter on GPT-2 already differs
# from the same oracle by ~2.5e-5 on O(1) logits; 6e-5 leaves room for that and is far below any
# real error (a wrong slot, scale or padding moves logits by > 1e-2).
F32 = dict(rtol=6e-5, atol=6e-5)


def _is_lw(x):
  return isinstance(x, jlora.LoraWeight)


def dense_jnp(tree):
  """Differentiable dense form of a plain LoRA tree: W0 + scale·(A⊗B) laid out like W0 (jnp einsum)."""

  def dense(w):
    if not _is_lw(w):
      return w
    spec = w.spec
    letters = "abcdefgh"
    a_axes = "".join(letters[i] for i in spec.batch_axes + spec.in_axes) + "r"
    b_axes = "".join(letters[i] for i in spec.batch_axes) + "r" + "".join(letters[i] for i in spec.out_axes)
    out = letters[:len(spec.shape)]
    d = jnp.einsum(f"{a_axes},{b_axes}->{out}", w.a, w.b, precision=jax.lax.Precision.HIGHEST)
    return w.w0 + spec.scale * d

  return jax.tree.map(dense, tree, is_leaf=_is_lw)


# -- GPT-2: transposed Conv1D kernels, a tied embedding (lookup and output projection) -----------------


@pytest.fixture(scope="module")
def gpt2():
  cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=16)
  model = transformers.FlaxGPT2LMHeadModel(cfg, _do_init=False)
  params = jax.jit(model.init_weights, static_argnums=1)(jax.random.key(0), (1, 1))
  fwd = lambda p, ids: model(ids, params=p).logits
  layout = jlora.infer_layout(fwd, params, jnp.zeros((1, 4), jnp.int32))
  mk = lambda key, cfg: randomize(jlora.init(key, params, cfg, layout=layout), jax.random.fold_in(key, 1), scale=0.2)
  adapters = [
      # rank 2 everywhere, c_fc with its own rank and alpha (per-rule scale), and the tied embedding
      mk(jax.random.key(1), jlora.LoraConfig(rank=2, alpha=4, targets=[
          jlora.Rule(pattern=r".*/c_fc/kernel", rank=3, alpha=1.5), r".*/(c_attn|c_proj)/kernel",
          r".*/wte/embedding"])),
      # rank 8 rsLoRA
      mk(jax.random.key(2), jlora.LoraConfig(rank=8, alpha=6, rslora=True,
                                             targets=r".*/(c_attn|c_proj|c_fc)/kernel|.*/wte/embedding")),
      # rank 4 with fewer targets
      mk(jax.random.key(3), jlora.LoraConfig(rank=4, alpha=8, targets=r".*/c_attn/kernel")),
  ]
  tokens = jax.random.randint(jax.random.key(9), (6, 8), 0, 97)
  row_ids = jnp.array([0, 1, 2, -1, 1, 0])
  oracle = jax.jit(fwd)
  want = np.concatenate([np.asarray(oracle(params if i < 0 else oracle_params(adapters[i]), tokens[r:r + 1]))
                         for r, i in enumerate(row_ids.tolist())])
  # one jitted runner for every test: banks with equal specs and inputs of equal shapes share its compilation
  run = jax.jit(lambda b, t, ids: jlora.wrap(fwd)(b, t, adapter_ids=ids))
  return dict(params=params, fwd=fwd, adapters=adapters, tokens=tokens, row_ids=row_ids, want=want, run=run,
              oracle=oracle)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mixed_batch_equals_each_row_alone(gpt2, strategy):
  bank = jlora.stack(gpt2["adapters"], strategy=strategy)
  assert_close(gpt2["run"](bank, gpt2["tokens"], gpt2["row_ids"]), gpt2["want"], **F32)


def test_bank_structure_keeps_each_adapter(gpt2):
  bank = jlora.stack(gpt2["adapters"])
  w = bank["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
  assert w.spec.variant == jlora.Bank(slots=3) and w.spec.rank == 8
  assert w.factors["ranks"].tolist() == [2, 8, 4]
  np.testing.assert_allclose(w.factors["scales"], [4 / 2, 6 / np.sqrt(8), 8 / 4], rtol=1e-7)
  fc = bank["transformer"]["h"]["0"]["mlp"]["c_fc"]["kernel"]
  assert fc.factors["ranks"].tolist() == [3, 8, 0]  # adapter 2 does not target c_fc: a zero slot
  np.testing.assert_allclose(fc.factors["scales"], [1.5 / 3, 6 / np.sqrt(8), 0.0], rtol=1e-7)
  assert not np.any(np.asarray(fc.a[2])) and not np.any(np.asarray(fc.b[2]))
  assert np.all(np.asarray(w.a[0, :, 2:]) == 0) and np.all(np.asarray(w.b[0, 2:]) == 0)  # padded rank
  # stack / unstack round trip: the same factors, and the same update
  for i, ad in enumerate(gpt2["adapters"]):
    back = jlora.multi.unstack(bank, i)
    orig = {p: x for p, x in jax.tree_util.tree_flatten_with_path(ad, is_leaf=_is_lw)[0] if _is_lw(x)}
    got = {p: x for p, x in jax.tree_util.tree_flatten_with_path(back, is_leaf=_is_lw)[0] if _is_lw(x)}
    assert got.keys() == orig.keys()
    for p, o in orig.items():
      np.testing.assert_array_equal(got[p].a, o.a)
      np.testing.assert_array_equal(got[p].b, o.b)
      assert got[p].spec.rank == o.spec.rank
      assert np.float32(got[p].spec.scale) == np.float32(o.spec.scale)


def _chain_rule(w, g_dense):
  """dL/dA and dL/dB (float64) of W = W0 + scale·(A⊗B) laid out by ``w.spec``, from dL/dW."""
  spec = w.spec
  letters = "abcdefgh"
  a_axes = "".join(letters[i] for i in spec.batch_axes + spec.in_axes) + "r"
  b_axes = "".join(letters[i] for i in spec.batch_axes) + "r" + "".join(letters[i] for i in spec.out_axes)
  k_axes = letters[:len(spec.shape)]
  g, a, b = (np.asarray(t, np.float64) for t in (g_dense, w.a, w.b))
  return (spec.scale * np.einsum(f"{k_axes},{b_axes}->{a_axes}", g, b),
          spec.scale * np.einsum(f"{k_axes},{a_axes}->{b_axes}", g, a))


def test_gradients_of_a_mixed_batch_are_each_adapters_own(gpt2):
  bank = jlora.stack(gpt2["adapters"], strategy="gather")
  tokens, ids = gpt2["tokens"], jnp.array([0, 2, 2, -1, 1, 0])
  fwd = gpt2["fwd"]

  def ce(logits, t):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], t[:, 1:]).sum()

  trainable, frozen = jlora.split(bank)
  loss = lambda a: ce(jlora.wrap(fwd)(jlora.combine(a, frozen), tokens, adapter_ids=ids), tokens)
  g = jax.jit(jax.grad(loss))(trainable)
  gb = {p: x for p, x in jax.tree_util.tree_flatten_with_path(g, is_leaf=_is_lw)[0] if _is_lw(x)}
  # reference: autodiff of the plain model w.r.t. its dense kernels on the adapter's rows alone,
  # then the chain rule to A and B (one compilation serves every adapter: same tree, same shapes)
  dense_grad = jax.jit(jax.grad(lambda p, t: ce(fwd(p, t), t)))
  for k, ad in enumerate(gpt2["adapters"]):
    rows = np.flatnonzero(np.asarray(ids) == k)
    gk = dense_grad(oracle_params(ad), tokens[rows])
    flat_g = dict(jax.tree_util.tree_flatten_with_path(gk)[0])
    want = {p: _chain_rule(w, flat_g[p]) for p, w in jax.tree_util.tree_flatten_with_path(ad, is_leaf=_is_lw)[0]
            if _is_lw(w)}
    for p, wb in gb.items():
      if p in want:
        wa, wbb = want[p]
        r = wa.shape[-1]
        # float32 autodiff vs float64 chain rule on float32 dense gradients: agreement to ~1e-5 of
        # the gradient's own scale (a wrong row or slot changes it by O(1)).
        scale = float(np.abs(wa).max() + np.abs(wbb).max())
        assert_close(wb.a[k][..., :r], wa, rtol=1e-4, atol=1e-5 * scale)
        assert_close(wb.b[k][:r], wbb, rtol=1e-4, atol=1e-5 * scale)
        assert not np.any(np.asarray(wb.a[k][..., r:])) and not np.any(np.asarray(wb.b[k][r:]))
      else:  # a kernel this adapter does not target: its zero slot gets no gradient
        assert not np.any(np.asarray(wb.a[k])) and not np.any(np.asarray(wb.b[k]))
  # one multi-tenant optimizer step: the slots train side by side; a zero slot and the padding stay zero
  tx = jlora.optimizer(optax.adam(1e-2), trainable)
  updates, _ = tx.update(g, tx.init(trainable), trainable)
  new = optax.apply_updates(trainable, updates)
  old_w, new_w = (t["transformer"]["h"]["1"]["mlp"]["c_fc"]["kernel"] for t in (trainable, new))
  assert not np.any(np.asarray(new_w.a[2])) and not np.any(np.asarray(new_w.b[2]))  # adapter 2 has no c_fc
  assert np.abs(np.asarray(new_w.a[0] - old_w.a[0])).max() > 1e-4
  assert np.abs(np.asarray(new_w.a[1] - old_w.a[1])).max() > 1e-4
  np.testing.assert_array_equal(new_w.a[0][..., 3:], 0.0)


def test_put_and_remove_do_not_recompile(gpt2):
  a0, a1, a2 = gpt2["adapters"]
  run, oracle, tokens = gpt2["run"], gpt2["oracle"], gpt2["tokens"]
  bank = jlora.stack([a0, a1], slots=3, strategy="gather")  # same spec as the 3-adapter bank
  assert jlora.multi.slots(bank) == [0, 1]
  ids = jnp.array([2, 0, 1, 2, 0, 1])
  y = run(bank, tokens, ids)
  compiled = run._cache_size()
  assert_close(y[0], oracle(gpt2["params"], tokens[:1])[0], **F32)  # an empty slot computes the base
  bank = jlora.multi.put(bank, 2, a2)
  bank = jlora.multi.put(bank, 0, a1)  # replaces a0
  bank = jlora.multi.remove(bank, 1)
  assert jlora.multi.slots(bank) == [0, 2]
  y = run(bank, tokens, ids)
  assert run._cache_size() == compiled
  assert_close(y[0], oracle(oracle_params(a2), tokens[:1])[0], **F32)
  assert_close(y[1], oracle(oracle_params(a1), tokens[1:2])[0], **F32)
  assert_close(y[2], oracle(gpt2["params"], tokens[2:3])[0], **F32)
  bank2 = jax.jit(jlora.multi.put)(bank, jnp.int32(1), a0)  # under jit, with a traced slot
  assert jlora.multi.slots(bank2) == [0, 1, 2]
  np.testing.assert_array_equal(jlora.multi.unstack(bank2, 1)["transformer"]["wte"]["embedding"].a,
                                a0["transformer"]["wte"]["embedding"].a)


# -- small models: padding, dropout, scan over stacked layers, per-token ids, convolutions ------------------


def _mlp():
  model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(8)])
  x = jax.random.normal(jax.random.key(0), (3, 5, 8))
  params = model.init(jax.random.key(1), x)["params"]
  return (lambda p, x: model.apply({"params": p}, x)), params, x


def test_padded_rank_equals_unpadded():
  f, params, x = _mlp()
  ad = randomize(jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, alpha=3, targets=".*/kernel")),
                 jax.random.key(1))
  bank = jlora.stack([ad], rank=8, slots=2)
  assert bank["layers_0"]["kernel"].a.shape == (2, 8, 8)
  got = jax.jit(lambda b, x: jlora.wrap(f)(b, x, adapter_ids=jnp.zeros(3, jnp.int32)))(bank, x)
  assert_close(got, jax.jit(f)(oracle_params(ad), x), **F32)


def test_dropout_matches_a_plain_adapter_with_the_same_key():
  f, params, x = _mlp()
  ad = randomize(jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=4, dropout=0.3, targets=".*/kernel")),
                 jax.random.key(1))
  key = jax.random.key(4)
  plain = jax.jit(lambda p, x, k: jlora.wrap(f)(p, x, lora_rng=k))
  want = plain(ad, x, key)
  assert np.abs(np.asarray(want - plain(ad, x, jax.random.key(5)))).max() > 1e-3  # dropout acts
  # dropout acts on the layer input before any slot selection: one strategy shows it
  run = jax.jit(lambda b, x, k: jlora.wrap(f)(b, x, adapter_ids=jnp.zeros(3, jnp.int32), lora_rng=k))
  assert_close(run(jlora.stack([ad], strategy="gather"), x, key), want, **F32)


def _scanned():
  key = jax.random.key(0)
  params = {"layers": {"w1": jax.random.normal(key, (3, 8, 8)) / 3,
                       "w2": jax.random.normal(jax.random.key(1), (3, 8, 8)) / 3}}

  def f(p, x):  # x: (B, T, 8); three stacked layers under lax.scan
    def body(h, w):
      return h + jnp.tanh(h @ w["w1"]) @ w["w2"], None

    return jax.lax.scan(body, x, p["layers"])[0]

  layout = {f"layers/{n}": jlora.KernelLayout(in_axes=(1,), batch_axes=(0,)) for n in ("w1", "w2")}
  return f, params, layout


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_scan_over_stacked_layers_and_grad(strategy):
  f, params, layout = _scanned()
  ads = [randomize(jlora.init(jax.random.key(i), params, cfg, layout=layout), jax.random.key(10 + i))
         for i, cfg in enumerate([jlora.LoraConfig(rank=2, targets="layers/w.*"),
                                  jlora.LoraConfig(rank=4, alpha=3, rslora=True, targets="layers/w1")])]
  bank = jlora.stack(ads, strategy=strategy)
  assert bank["layers"]["w1"].factors["scales"].shape == (3, 2)
  x = jax.random.normal(jax.random.key(5), (4, 5, 8))
  ids = jnp.array([1, 0, -1, 1])
  got = jax.jit(lambda b, x, i: jlora.wrap(f)(b, x, adapter_ids=i))(bank, x, ids)
  oracle = jax.jit(f)
  for r, i in enumerate(ids.tolist()):
    assert_close(got[r:r + 1], oracle(params if i < 0 else oracle_params(ads[i]), x[r:r + 1]), **F32)
  trainable, frozen = jlora.split(bank)
  loss = lambda a, ids: jnp.sum(jlora.wrap(f)(jlora.combine(a, frozen), x, adapter_ids=ids) ** 2)
  g = jax.jit(jax.grad(loss))(trainable, ids)
  for k in (0, 1):
    rows = np.flatnonzero(np.asarray(ids) == k)
    a_k, fr_k = jlora.split(ads[k])
    gk = jax.grad(lambda a: jnp.sum(f(dense_jnp(jlora.combine(a, fr_k)), x[rows]) ** 2))(a_k)
    want = gk["layers"]["w1"]
    r = want.spec.rank
    # float32 autodiff of two exact formulations: agreement to ~1e-5 of the gradient's own scale
    tol = dict(rtol=1e-4, atol=1e-5 * float(np.abs(np.asarray(want.a)).max()))
    assert_close(g["layers"]["w1"].a[:, k, :, :r], want.a, **tol)
    assert_close(g["layers"]["w1"].b[:, k, :r], want.b, **tol)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_per_token_ids_on_position_wise_layers(strategy):
  f, params, x = _mlp()
  ads = [randomize(jlora.init(jax.random.key(i), params, jlora.LoraConfig(rank=r, targets=t)), jax.random.key(7 + i))
         for i, (r, t) in enumerate([(2, ".*/kernel"), (3, "layers_0/kernel"), (4, "layers_2/kernel")])]
  bank = jlora.stack(ads, strategy=strategy)
  ids = jax.random.randint(jax.random.key(3), (3, 5), -1, 3)
  got = jax.jit(lambda b, x, i: jlora.wrap(f)(b, x, adapter_ids=i))(bank, x, ids)
  # each token is independent here: token (b, t) equals the model with its own adapter on it
  outs = [jax.jit(f)(params if i < 0 else oracle_params(ads[i]), x) for i in (-1, 0, 1, 2)]
  want = np.select([np.asarray(ids)[..., None] == i for i in (-1, 0, 1, 2)], [np.asarray(o) for o in outs])
  assert_close(got, want, **F32)
  # a layer that flattens (B, T, d) to (B*T, d): (B, T) ids are flattened with it
  flat = lambda p, x: f(p, x.reshape(-1, 8)).reshape(3, 5, 8)
  assert_close(jax.jit(lambda b, x, i: jlora.wrap(flat)(b, x, adapter_ids=i))(bank, x, ids), want, **F32)
  if strategy == "gather":
    # (B,) ids on the flattened rows: each row's id is followed back through the reshape.
    row_ids = ids[:, 0]
    row_want = np.select([np.asarray(row_ids)[:, None, None] == i for i in (-1, 0, 1, 2)], [np.asarray(o) for o in outs])
    assert_close(jax.jit(lambda b, x, i: jlora.wrap(flat)(b, x, adapter_ids=i))(bank, x, row_ids), row_want, **F32)
    # Rows mixed by a reduction over tokens cannot be followed back to the batch.
    mixed = lambda p, x: f(p, jnp.cumsum(x.reshape(-1, 8), axis=0)).reshape(3, 5, 8)
    with pytest.raises(jlora.LoraApplyError, match=r"batch axes have shape \(15,\), which adapter_ids of shape \(3,\)"):
      jax.eval_shape(lambda b, x, i: jlora.wrap(mixed)(b, x, adapter_ids=i), bank, x, row_ids)


def test_convolution_bank():
  model = nn.Conv(4, (3, 3))
  x = jax.random.normal(jax.random.key(0), (3, 6, 6, 2))
  params = model.init(jax.random.key(1), x)["params"]
  f = lambda p, x: model.apply({"params": p}, x)
  layout = jlora.infer_layout(f, params, x)
  ads = [randomize(jlora.init(jax.random.key(i), params, jlora.LoraConfig(rank=r, alpha=2, targets="kernel"),
                               layout=layout), jax.random.key(5 + i)) for i, r in enumerate((2, 3))]
  got = jax.jit(lambda b, x, i: jlora.wrap(f)(b, x, adapter_ids=i))(jlora.stack(ads), x, jnp.array([1, -1, 0]))
  outs = {i: jax.jit(f)(params if i < 0 else oracle_params(ads[i]), x) for i in (-1, 0, 1)}
  for r, i in enumerate((1, -1, 0)):
    assert_close(got[r], outs[i][r], **F32)


def test_fresh_bank_from_init_and_checkpoint_round_trip(tmp_path):
  f, params, layout = _scanned()
  cfg = jlora.LoraConfig(rank=4, alpha=8, targets="layers/w1", variant=jlora.Bank(slots=3))
  bank = jlora.init(jax.random.key(0), params, cfg, layout=layout)
  w = bank["layers"]["w1"]
  assert w.a.shape == (3, 3, 8, 4) and w.factors["ranks"].tolist() == [[4] * 3] * 3
  np.testing.assert_allclose(w.factors["scales"], np.full((3, 3), 2.0))
  assert jax.tree.leaves(jlora.labels({"w": w})) == ["frozen", "lora", "lora", "frozen", "frozen"]
  assert "variant=bank[3]" in repr(w)
  bank = randomize(bank, jax.random.key(5))
  back = jlora.load_adapter(jlora.save_adapter(str(tmp_path / "bank"), bank), params)["layers"]["w1"]
  assert back.spec == bank["layers"]["w1"].spec
  for name, child in bank["layers"]["w1"].factors.items():
    np.testing.assert_array_equal(back.factors[name], child)
    assert back.factors[name].dtype == child.dtype
  with pytest.raises(ValueError, match="no single update to merge"):
    jlora.merge(bank)


# -- errors ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Magnitude(jlora.Variant):
  """A test variant with an extra trained child, standing in for DoRA."""

  name = "test-dora-like"

  def factor_axes(self, spec):
    return {**super().factor_axes(spec), "m": tuple(spec.out_axes)}


def test_errors_name_the_problem_and_the_fix():
  params = {"w": jnp.ones((8, 6))}
  a = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets="w"))
  # Another base of the same shape (kernels are fingerprinted by their blockwise NF4 codes, which
  # do not see a uniform rescaling: jlora.fingerprint's docstring).
  other_base = {"w": jax.random.normal(jax.random.key(7), (8, 6))}
  other = jlora.init(jax.random.key(0), other_base, jlora.LoraConfig(rank=2, targets="w"))
  with pytest.raises(ValueError, match=r"adapters\[1\] was trained on another base .*fingerprint"):
    jlora.stack([a, other])
  with pytest.raises(ValueError, match=r"different base models: 'w' has shape"):
    jlora.stack([a, jlora.init(jax.random.key(0), {"w": jnp.ones((8, 5))}, jlora.LoraConfig(rank=2, targets="w"))])
  w = a["w"]
  dora = {"w": jlora.LoraWeight(w.w0, w.a, w.b, dataclasses.replace(w.spec, variant=_Magnitude()), {"m": jnp.ones(6)})}
  with pytest.raises(ValueError, match=r"'w' is a 'test-dora-like' adapter; a bank serves plain LoRA adapters only"):
    jlora.stack([a, dora])
  with pytest.raises(ValueError, match="at least one adapter"):
    jlora.stack([])
  with pytest.raises(ValueError, match="holds no LoRA adapters"):
    jlora.stack([params])
  with pytest.raises(ValueError, match=r"slots=1 must be an integer >= the number of adapters \(2\)"):
    jlora.stack([a, a], slots=1)
  with pytest.raises(ValueError, match=r"rank 2 at 'w', above rank=1"):
    jlora.stack([a], rank=1)
  bank = jlora.stack([a], slots=2)
  with pytest.raises(ValueError, match="already a bank"):
    jlora.stack([bank])
  f = lambda p, x: x @ p["w"]
  x = jnp.ones((2, 8))
  with pytest.raises(jlora.LoraApplyError, match=r"'w' is a bank of 2 adapters .*adapter_ids="):
    jlora.wrap(f)(bank, x)
  with pytest.raises(jlora.LoraApplyError, match=r"values in \[0, 2\], but the bank 'w' has slots 0..1"):
    jlora.wrap(f)(bank, x, adapter_ids=jnp.array([0, 2]))
  with pytest.raises(jlora.LoraApplyError, match="must be an integer array"):
    jlora.wrap(f)(bank, x, adapter_ids=jnp.array([0.0, 1.0]))
  with pytest.raises(jlora.LoraApplyError, match=r"shape \(3,\) do not fit"):
    jlora.wrap(f)(bank, x, adapter_ids=jnp.array([0, 1, 1]))
  with pytest.raises(ValueError, match=r"slot 2 is not in 0..1"):
    jlora.multi.put(bank, 2, a)
  big = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=4, targets="w"))
  with pytest.raises(ValueError, match=r"rank at 'w' is 4, above the bank's padded rank 2.*rank=\.\.\."):
    jlora.multi.put(bank, 1, big)
  two = {"w": jnp.ones((8, 6)), "v": jnp.ones((6, 6))}
  b2 = jlora.stack([jlora.init(jax.random.key(0), two, jlora.LoraConfig(rank=2, targets="w"))])
  with pytest.raises(ValueError, match=r"targets 'v', which the bank has no slots for"):
    jlora.multi.put(b2, 0, jlora.init(jax.random.key(0), two, jlora.LoraConfig(rank=2, targets="v")))
  with pytest.raises(ValueError, match="no bank of adapters"):
    jlora.multi.slots(a)
  with pytest.raises(ValueError, match="strategy must be one of"):
    jlora.Bank(slots=2, strategy="fast")
  with pytest.raises(ValueError, match="slots must be a positive integer"):
    jlora.Bank(slots=0)
