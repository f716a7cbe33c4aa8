"""AdaLoRA: the rank allocator step by step against PEFT's RankAllocator (same gradients), the
PEFT ADALORA format both ways with logits parity, the orthogonality regulariser against PEFT's
loss, conversion to plain LoRA with per-kernel ranks, and the allocator under jit/scan."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
import jlora.peft
from helpers import assert_close
from hf_models import IDS, flax_logits, hf_base, lm_loss, torch_logits, torch_model

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TOL = dict(rtol=2e-5, atol=2e-5)  # float32 both sides (see test_variant_formats)
SCHEDULE = dict(target_r=2, init_r=6, tinit=2, tfinal=3, deltaT=2, total_step=12)
OURS = dict(target_rank=2, tinit=2, tfinal=3, delta_t=2, total_steps=12)


@pytest.fixture
def llama():
  return hf_base("llama", native=False)  # per-layer kernels: the tests index modules as PEFT names them


def _peft_adalora(**kw):
  # task_type: a bare PeftModel calls the transformers model directly, skipping AdaLoraModel.forward
  # and with it the orthogonality term.
  cfg = peft.AdaLoraConfig(lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                           **{**SCHEDULE, **kw})
  return peft.get_peft_model(torch_model("llama"), cfg)


def _module(name):  # torch parameter name -> (module, kind)
  head, kind, _ = name.rsplit(".", 2)
  return head.replace("base_model.model.", ""), kind


def _flax_path(module):
  return module.replace(".", "/") + "/kernel"


def test_rank_allocator_matches_peft_step_by_step(llama, tmp_path):
  loaded, _ = llama
  pm = _peft_adalora()
  d = str(tmp_path / "init")
  pm.save_pretrained(d)
  lp = jlora.peft.load(d, loaded.params, module_map=loaded.module_map, layout=loaded.layout)
  adapters, frozen = jlora.split(lp)
  lr = 0.05
  tx = jlora.optimizer(jlora.adalora(optax.sgd(lr), **OURS), adapters)
  state = tx.init(adapters)
  update = jax.jit(tx.update)
  topt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=lr)
  tparams = {n: p for n, p in pm.named_parameters() if p.requires_grad}
  rng = np.random.default_rng(0)
  for step in range(1, SCHEDULE["total_step"] + 1):
    grads_t = {n: rng.normal(size=tuple(p.shape)).astype(np.float32) for n, p in tparams.items()}
    for n, p in tparams.items():
      p.grad = torch.from_numpy(grads_t[n].copy())
    topt.step()
    pm.base_model.update_and_allocate(step)

    def grad_of(path, w):
      module = path.rsplit("/", 1)[0].replace("/", ".")
      pre = f"base_model.model.{module}"
      return w.replace(a=grads_t[f"{pre}.lora_A.default"].T, b=grads_t[f"{pre}.lora_B.default"].T,
                       e=grads_t[f"{pre}.lora_E.default"].reshape(-1))

    grads = jax.tree_util.tree_map_with_path(
        lambda p, w: grad_of(jax.tree_util.keystr(p, simple=True, separator="/"), w) if isinstance(w, jlora.LoraWeight) else w,
        adapters, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
    u, state = update(grads, state, adapters)
    adapters = optax.apply_updates(adapters, u)
    ws = jlora._checkpoint.adapter_weights(adapters)
    for n, p in tparams.items():
      module, kind = _module(n)
      w = ws[_flax_path(module)]
      if kind == "lora_E":  # zeroed exactly where PEFT zeroed it, equal elsewhere
        e_t = p.detach().numpy().reshape(-1)
        np.testing.assert_array_equal(np.asarray(w.factors["e"]) == 0, e_t == 0, err_msg=f"step {step} {n}")
        np.testing.assert_allclose(np.asarray(w.factors["e"]), e_t, rtol=1e-5, atol=1e-6)
  final = jlora.adalora_finalize(jlora.combine(adapters, frozen), state)
  pattern = jlora.variants.rank_pattern(final)
  peft_pattern = pm.peft_config["default"].rank_pattern
  assert sum(sum(v) for v in peft_pattern.values()) == 2 * 4  # target_r × matrices
  for key, kept in peft_pattern.items():
    module = key.replace("base_model.model.", "").rsplit(".lora_E", 1)[0]
    np.testing.assert_array_equal(pattern[_flax_path(module)], np.asarray(kept))


def _train_torch_adalora(pm, steps):
  pm.train()
  opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
  ids = torch.tensor(IDS)
  for step in range(1, steps + 1):
    pm(input_ids=ids, labels=ids).loss.backward()  # includes PEFT's orthogonality term
    opt.step()
    pm.base_model.update_and_allocate(step)
    opt.zero_grad()
  return pm.eval()


def test_peft_trained_adalora_loads_in_jlora_and_back(llama, tmp_path):
  loaded, _ = llama
  pm = _train_torch_adalora(_peft_adalora(), SCHEDULE["total_step"])
  d = str(tmp_path / "peft")
  pm.save_pretrained(d)
  assert json.load(open(os.path.join(d, "adapter_config.json")))["rank_pattern"]
  lp = jlora.peft.load(d, loaded.params, module_map=loaded.module_map, layout=loaded.layout)
  want = torch_logits(pm)
  np.testing.assert_allclose(flax_logits(loaded, lp), want, **TOL)
  kept = {p: int(m.sum()) for p, m in jlora.variants.rank_pattern(lp).items()}
  assert sum(kept.values()) == 8
  # Plain LoRA with per-kernel ranks: same logits in jlora, and in PEFT via rank_pattern.
  plain = jlora.to_lora(lp)
  ws = jlora._checkpoint.adapter_weights(plain)
  assert {p: w.spec.rank for p, w in ws.items()} == {p: k for p, k in kept.items() if k}
  np.testing.assert_allclose(flax_logits(loaded, plain), want, **TOL)
  out = jlora.peft.save(str(tmp_path / "plain"), plain, module_map=loaded.module_map)
  np.testing.assert_allclose(torch_logits(peft.PeftModel.from_pretrained(torch_model("llama"), out).eval()),
                             want, **TOL)
  # jlora's AdaLoRA export of the same adapter loads in PEFT again.
  again = jlora.peft.save(str(tmp_path / "again"), lp, module_map=loaded.module_map,
                          adalora_config={"total_step": SCHEDULE["total_step"]})
  np.testing.assert_allclose(torch_logits(peft.PeftModel.from_pretrained(torch_model("llama"), again).eval()),
                             want, **TOL)


def test_orthogonality_penalty_matches_peft(llama, tmp_path):
  loaded, _ = llama
  pm = _peft_adalora()
  torch.manual_seed(3)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_" in n:
        p.normal_(0, 0.3)
  pm.train()
  ids = torch.tensor(IDS)
  with torch.no_grad():
    with_reg = float(pm(input_ids=ids, labels=ids).loss)
    pm.peft_config["default"].orth_reg_weight = 0.0
    without = float(pm(input_ids=ids, labels=ids).loss)
  d = str(tmp_path / "p")
  pm.save_pretrained(d)
  lp = jlora.peft.load(d, loaded.params, module_map=loaded.module_map, layout=loaded.layout)
  assert float(lm_loss(loaded, lp)) == pytest.approx(without, rel=1e-5)
  assert 0.5 * float(jlora.orthogonality_penalty(lp)) == pytest.approx(with_reg - without, rel=1e-5)


def test_jlora_trained_adalora_exports_to_peft(llama, tmp_path):
  loaded, lay = llama
  cfg = jlora.LoraConfig(rank=6, alpha=8, targets=r".*/(q_proj|v_proj)/kernel", variant=jlora.AdaLoRA())
  assert cfg.init == "adalora"
  lp = jlora.init(jax.random.key(0), loaded.params, cfg, layout=lay)
  adapters, frozen = jlora.split(lp)
  tx = jlora.optimizer(jlora.adalora(optax.adamw(1e-2, weight_decay=0.0), **OURS), adapters)
  state = tx.init(adapters)

  @jax.jit
  def step(adapters, state):
    loss = lambda a: lm_loss(loaded, jlora.combine(a, frozen)) + 0.5 * jlora.orthogonality_penalty(a)
    u, state = tx.update(jax.grad(loss)(adapters), state, adapters)
    return optax.apply_updates(adapters, u), state

  for _ in range(OURS["total_steps"]):
    adapters, state = step(adapters, state)
  lp = jlora.adalora_finalize(jlora.combine(adapters, frozen), state)
  kept = jlora.variants.rank_pattern(lp)
  assert sum(int(m.sum()) for m in kept.values()) == 8
  want = flax_logits(loaded, lp)
  assert np.abs(want - torch_logits(torch_model("llama"))).max() > 1e-4
  out = jlora.peft.save(str(tmp_path / "ada"), lp, module_map=loaded.module_map, adalora_config={"total_step": 12})
  cfg_json = json.load(open(os.path.join(out, "adapter_config.json")))
  assert cfg_json["peft_type"] == "ADALORA" and cfg_json["init_r"] == 6
  pm = peft.PeftModel.from_pretrained(torch_model("llama"), out).eval()
  np.testing.assert_allclose(torch_logits(pm), want, **TOL)
  # Round trip through the PEFT directory: exact on the kept ranks (PEFT saves only those).
  back = jlora.peft.load(out, loaded.params, module_map=loaded.module_map, layout=loaded.layout)
  for p, w in jlora._checkpoint.adapter_weights(lp).items():
    b, k = jlora._checkpoint.adapter_weights(back)[p], kept[p]
    assert b.spec == w.spec
    for n in ("e", "rank_mask"):
      np.testing.assert_array_equal(np.asarray(b.factors[n]), np.asarray(w.factors[n]))
    np.testing.assert_array_equal(np.asarray(b.a)[:, k], np.asarray(w.a)[:, k])
    np.testing.assert_array_equal(np.asarray(b.b)[k], np.asarray(w.b)[k])
    np.testing.assert_array_equal(np.asarray(b.a)[:, ~k], 0.0)
  # A jlora checkpoint keeps the rank pattern.
  d = jlora.save_adapter(str(tmp_path / "ckpt"), lp)
  again = jlora.load_adapter(d, loaded.params)
  assert all((jlora.variants.rank_pattern(again)[p] == m).all() for p, m in kept.items())


def test_allocator_on_stacked_kernels_and_merge_oracle():
  params = {"w": jax.random.normal(jax.random.key(0), (3, 8, 6)) / 3}
  f = lambda p, x: jax.lax.scan(lambda c, w: (c, jnp.tanh(c @ w)), x, p["w"])[1]
  lay = jlora.KernelLayout(in_axes=(1,), batch_axes=(0,))
  cfg = jlora.LoraConfig(rank=4, alpha=8, targets=[jlora.Rule(pattern="w", layout=lay)], variant=jlora.AdaLoRA())
  lp = jlora.init(jax.random.key(1), params, cfg)
  w = lp["w"]
  assert w.factors["e"].shape == (3, 4) and w.factors["rank_mask"].shape == (3, 4)
  x = jax.random.normal(jax.random.key(2), (5, 8))
  adapters, frozen = jlora.split(lp)
  tx = jlora.optimizer(jlora.adalora(optax.adam(5e-2), target_rank=2, total_steps=6, tfinal=2), adapters)
  state = tx.init(adapters)

  @jax.jit
  def step(adapters, state):
    g = jax.grad(lambda a: jnp.sum(jlora.wrap(f)(jlora.combine(a, frozen), x) ** 2))(adapters)
    u, state = tx.update(g, state, adapters)
    return optax.apply_updates(adapters, u), state

  for _ in range(8):
    adapters, state = step(adapters, state)
  lp = jlora.adalora_finalize(jlora.combine(adapters, frozen), state)
  keep = jlora.variants.rank_pattern(lp)["w"]
  assert keep.sum() == 2 * 3  # target_rank × 3 stacked matrices
  w = lp["w"]
  np.testing.assert_array_equal(np.asarray(w.factors["e"])[~keep], 0.0)
  # Dense float64 oracle: ΔW = Q·(Λ ⊙ P)·alpha/(r + 1e-5) per layer.
  a, b, e = (np.asarray(w.factors[n], np.float64) for n in ("a", "b", "e"))
  dense = np.asarray(w.w0, np.float64) + np.einsum("lir,lr,lro->lio", a, e, b) * 8 / (4 + 1e-5)
  assert_close(jlora.wrap(f)(lp, x), f({"w": dense}, x), rtol=2e-5, atol=2e-5)
  assert_close(jlora.merge(lp)["w"], dense, rtol=2e-5, atol=2e-6)
  plain = jlora.to_lora(lp)["w"]
  assert plain.spec.rank == int(keep.sum(axis=1).max()) and plain.spec.variant == jlora.Variant()
  assert_close(jlora.merge({"w": plain})["w"], dense, rtol=2e-5, atol=2e-6)


def test_bad_schedules_and_missing_params_are_errors():
  with pytest.raises(ValueError, match="leaves no budgeting phase"):
    jlora.adalora(optax.sgd(1.0), target_rank=2, total_steps=10, tinit=5, tfinal=5)
  with pytest.raises(ValueError, match="total_steps must be an integer > 0"):
    jlora.adalora(optax.sgd(1.0), target_rank=2, total_steps=0)
  with pytest.raises(ValueError, match="beta1 must be in"):
    jlora.adalora(optax.sgd(1.0), target_rank=2, total_steps=10, beta1=1.0)
  plain = jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4))}, jlora.LoraConfig(rank=2, targets="w"))
  with pytest.raises(ValueError, match="hold no AdaLoRA adapters"):
    jlora.adalora(optax.sgd(1.0), target_rank=1, total_steps=3).init(plain)
  with pytest.raises(ValueError, match="AdaLoRA scales by alpha"):
    jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4))},
               jlora.LoraConfig(rank=2, targets="w", rslora=True, variant=jlora.AdaLoRA()))
  ada = jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4))},
                   jlora.LoraConfig(rank=2, targets="w", variant=jlora.AdaLoRA()))
  tx = jlora.adalora(optax.sgd(1.0), target_rank=1, total_steps=3)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(ada, tx.init(ada))


def test_adalora_on_scanned_layers_exports_to_peft_and_back(tmp_path):
  """jlora.models' stacked kernels: one PEFT module per layer, each with its own kept ranks."""
  loaded, lay = hf_base("llama")  # native: (layers, in, out) kernels under scan
  cfg = jlora.LoraConfig(rank=6, alpha=8, targets=r".*/(q_proj|v_proj)/kernel", variant=jlora.AdaLoRA())
  adapters, frozen = jlora.split(jlora.init(jax.random.key(0), loaded.params, cfg, layout=lay))
  tx = jlora.optimizer(jlora.adalora(optax.adamw(1e-2, weight_decay=0.0), **OURS), adapters)
  state = tx.init(adapters)

  @jax.jit
  def step(adapters, state):
    u, state = tx.update(jax.grad(lambda a: lm_loss(loaded, jlora.combine(a, frozen)))(adapters), state, adapters)
    return optax.apply_updates(adapters, u), state

  for _ in range(OURS["total_steps"]):
    adapters, state = step(adapters, state)
  lp = jlora.adalora_finalize(jlora.combine(adapters, frozen), state)
  kept = jlora.variants.rank_pattern(lp)
  assert {m.shape for m in kept.values()} == {(2, 6)}  # per layer
  want = flax_logits(loaded, lp)
  out = jlora.peft.save(str(tmp_path / "ada"), lp, module_map=loaded.module_map, adalora_config={"total_step": 12})
  pm = peft.PeftModel.from_pretrained(torch_model("llama"), out).eval()
  np.testing.assert_allclose(torch_logits(pm), want, **TOL)
  back = jlora.peft.load(out, loaded.params, module_map=loaded.module_map, layout=loaded.layout)
  np.testing.assert_allclose(flax_logits(loaded, back), want, **TOL)
  for p, m in kept.items():
    np.testing.assert_array_equal(np.asarray(jlora.variants.rank_pattern(back)[p]), np.asarray(m))
