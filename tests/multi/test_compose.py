"""``jlora.compose`` against real PEFT ``add_weighted_adapter`` on a PyTorch Llama, and beyond PEFT.

The adapters are made in PyTorch PEFT (random A and B, per-module ranks and alphas, one rsLoRA,
one with fewer targets), saved with PEFT's ``save_pretrained`` and loaded into jlora with
``jlora.peft.load``; the same three adapters are combined by PEFT, and every module's update
``ΔW = scaling·B·A`` of PEFT's result is compared with jlora's. DARE's random masks are the only
thing the two cannot share by construction: the test feeds jlora's masks to PEFT.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.multi
import jlora.peft
from jlora.multi import _compose

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHTS = [0.7, -0.4, 0.5]


def torch_llama():
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=97, max_position_embeddings=16)
  return transformers.LlamaForCausalLM(cfg).eval()


def _is_lw(x):
  return isinstance(x, jlora.LoraWeight)


def deltas(tree) -> dict[str, np.ndarray]:
  """Torch module name -> ΔW (out, in) of every adapter of a jlora tree (float64 NumPy from A, B, scale)."""
  out = {}
  for path, w in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_lw)[0]:
    if _is_lw(w):
      name = ".".join(str(getattr(k, "key", k)) for k in path[:-1])
      d = np.asarray(w.a, np.float64) @ np.asarray(w.b, np.float64) * w.spec.scale  # (in, out)
      out[name] = d.T
  return out


def peft_deltas(pm, adapter: str) -> dict[str, np.ndarray]:
  out = {}
  for name, module in pm.named_modules():
    if isinstance(module, peft.tuners.lora.LoraLayer) and adapter in module.lora_A:
      with torch.no_grad():
        out[name.removeprefix("base_model.model.")] = module.get_delta_weight(adapter).double().numpy()
  return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  configs = [
      peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False,
                      rank_pattern={"up_proj": 6}, alpha_pattern={"v_proj": 3}),
      peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"],
                      init_lora_weights=False, rank_pattern={"up_proj": 6}),
      peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False,
                      rank_pattern={"up_proj": 6}),
  ]
  dirs = []
  for i, cfg in enumerate(configs):
    base = torch_llama()
    torch.manual_seed(100 + i)  # after the base's own seed: each adapter its own random A and B
    pm = peft.get_peft_model(base, cfg)
    d = tmp_path_factory.mktemp(f"adapter{i}")
    pm.save_pretrained(str(d))
    dirs.append(str(d))
  tm = torch_llama()
  # The Flax-side base: every linear kernel (in, out) at the path transformers' Flax Llama uses.
  params: dict = {}
  for name, mod in tm.named_modules():
    if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LINEAR:
      node = params
      for part in name.split("."):
        node = node.setdefault(part, {})
      node["kernel"] = jnp.asarray(mod.weight.detach().numpy().T)
  adapters = [jlora.peft.load(d, params, model_type="llama") for d in dirs]
  pm = peft.PeftModel.from_pretrained(tm, dirs[0], adapter_name="a0")
  pm.load_adapter(dirs[1], adapter_name="a1")
  pm.load_adapter(dirs[2], adapter_name="a2")
  return dict(params=params, adapters=adapters, pm=pm, dirs=dirs)


def test_adapters_moved_from_peft_are_the_same(world):
  for i, ad in enumerate(world["adapters"]):
    want = peft_deltas(world["pm"], f"a{i}")
    got = deltas(ad)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)


CASES = [
    ("cat", {}),
    ("linear", {}),
    ("svd", {"rank": 6}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.7, "majority_sign": "frequency"}),
    ("magnitude_prune", {"density": 0.6}),
    ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.6, "majority_sign": "frequency"}),
    ("ties_svd", {"density": 0.5, "rank": 5}),
    ("magnitude_prune_svd", {"density": 0.6, "rank": 6}),
    ("dare_linear_svd", {"density": 0.5, "rank": 6}),
    ("dare_ties_svd", {"density": 0.5, "rank": 4}),
]


@pytest.mark.parametrize("method,kw", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_matches_peft_add_weighted_adapter(world, monkeypatch, method, kw):
  # DARE: record the masked tensors jlora draws, and make PEFT's random pruning return them.
  recorded: list[tuple[np.ndarray, np.ndarray]] = []
  original = _compose._random_prune

  def record(t, density, key):
    out = original(t, density, key)
    recorded.append((np.asarray(t), np.asarray(out)))
    return out

  monkeypatch.setattr(_compose, "_random_prune", record)
  composed = jlora.compose(world["adapters"], WEIGHTS, method=method, seed=3, **kw)

  def replay(tensor, density, rescale):
    t = tensor.detach().double().numpy()
    errs = [np.abs(src.T - t).max() if src.T.shape == t.shape else np.inf for src, _ in recorded]
    i = int(np.argmin(errs))
    assert errs[i] <= 1e-5 * (1 + np.abs(t).max()), "PEFT pruned a tensor jlora did not"
    return torch.from_numpy(recorded[i][1].T.copy()).to(tensor.dtype)

  monkeypatch.setattr(peft.utils.merge_utils, "random_pruning", replay)
  pm, name = world["pm"], f"m{len(pm_names := [n for n in world['pm'].peft_config])}"
  del pm_names
  pm.add_weighted_adapter(["a0", "a1", "a2"], WEIGHTS, name, combination_type=method, svd_rank=kw.get("rank"),
                          density=kw.get("density"), majority_sign_method=kw.get("majority_sign", "total"))
  want = peft_deltas(pm, name)
  got = deltas(composed)
  assert got.keys() == want.keys()
  for k in want:
    # float32 on both sides; SVD truncations and sums in other orders: 2e-5 of the update's scale
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=2e-5 * np.abs(want[k]).max(), err_msg=k)
  if method.startswith("dare"):
    assert recorded  # the masks were shared


def test_cat_and_svd_are_exact_for_rslora_and_any_ranks(world):
  adapters = world["adapters"]
  want = {}
  for ad, w in zip(adapters, WEIGHTS):
    for k, d in deltas(ad).items():
      want[k] = want.get(k, 0) + w * d  # dense float64 oracle: Σ w_i s_i B_i A_i
  cat = jlora.compose(adapters, WEIGHTS, method="cat")
  q = cat["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
  assert q.spec.rank == 12 and q.spec.scale == 1.0 and not q.spec.rslora
  assert cat["model"]["layers"]["0"]["self_attn"]["v_proj"]["kernel"].spec.rank == 8  # adapter 2 has no v_proj
  for k, d in deltas(cat).items():
    np.testing.assert_allclose(d, want[k], rtol=0, atol=1e-6 * np.abs(want[k]).max())
  # svd at full rank reproduces ΔW; truncated, it reports the energy kept (float64 oracle SVD)
  full = jlora.compose(adapters, WEIGHTS, method="svd", rank=12)
  for k, d in deltas(full).items():
    if "up_proj" not in k:  # q_proj / v_proj: sum of ranks 12 / 8 <= 12, nothing truncated
      np.testing.assert_allclose(d, want[k], rtol=0, atol=1e-5 * np.abs(want[k]).max())
  low, info = jlora.compose(adapters, WEIGHTS, method="svd", rank=2, return_info=True)
  key = "model/layers/1/mlp/up_proj/kernel"
  s = np.linalg.svd(want["model.layers.1.mlp.up_proj"], compute_uv=False)
  assert info.ranks[key] == 2
  np.testing.assert_allclose(info.energy_kept[key], (s[:2] ** 2).sum() / (s ** 2).sum(), rtol=1e-5)
  u, s_, vt = np.linalg.svd(want["model.layers.1.mlp.up_proj"])
  best = (u[:, :2] * s_[:2]) @ vt[:2]
  np.testing.assert_allclose(deltas(low)["model.layers.1.mlp.up_proj"], best, atol=1e-5 * np.abs(best).max())
  # default svd rank: the largest source rank per kernel (q_proj 4, up_proj 6)
  default = jlora.compose(adapters, WEIGHTS, method="svd")
  assert default["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].spec.rank == 4
  assert default["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"].spec.rank == 6
  # randomized SVD (rank + 10 samples) on updates of rank <= 16 (q_proj 12, v_proj 8): the exact SVD's result
  rnd = jlora.compose(adapters, WEIGHTS, method="magnitude_prune_svd", density=1.0, rank=6, svd="randomized")
  exact = deltas(jlora.compose(adapters, WEIGHTS, method="svd", rank=6))
  for k, d in deltas(rnd).items():
    if "up_proj" not in k:
      np.testing.assert_allclose(d, exact[k], atol=2e-5 * np.abs(d).max())


@pytest.mark.parametrize("method", ["cat", "svd", "linear", "ties", "dare_ties"])
def test_single_adapter_with_weight_one_is_returned_exactly(world, method):
  """PEFT #3761: one rsLoRA adapter with per-module ranks composed with weight 1.0 comes back as is."""
  ad = world["adapters"][1]  # rsLoRA, q/v rank 4, up_proj rank 6
  kw = {"density": 0.5} if method in ("ties", "dare_ties") else {}
  out = jlora.compose([ad], [1.0], method=method, **kw)
  for (p, w), (_, o) in zip(jax.tree_util.tree_flatten_with_path(out, is_leaf=_is_lw)[0],
                            jax.tree_util.tree_flatten_with_path(ad, is_leaf=_is_lw)[0]):
    if not _is_lw(o):
      assert w is o
      continue
    assert w.spec == o.spec, p
    np.testing.assert_array_equal(w.a, o.a)
    np.testing.assert_array_equal(w.b, o.b)
  half = jlora.compose([ad], [0.5], method=method, **kw)
  for k, d in deltas(half).items():
    np.testing.assert_allclose(d, 0.5 * deltas(ad)[k], rtol=1e-6, atol=1e-7)


def test_rank_and_alpha_patterns_survive_save_and_reload(world, tmp_path):
  """PEFT #3737: the composed adapter keeps per-module ranks and reloads in PEFT and in jlora."""
  pm = world["pm"]
  pm.add_weighted_adapter(["a0", "a1"], [0.6, 0.4], "lin", combination_type="linear")
  composed = jlora.compose(world["adapters"][:2], [0.6, 0.4], method="linear")
  d = jlora.peft.save(str(tmp_path / "peft"), composed, model_type="llama")
  cfg = json.load(open(os.path.join(d, "adapter_config.json")))
  assert cfg["r"] == 4 and cfg["rank_pattern"] == {f"model.layers.{i}.mlp.up_proj": 6 for i in (0, 1)}
  assert cfg["alpha_pattern"] == {f"model.layers.{i}.mlp.up_proj": 6.0 for i in (0, 1)} and cfg["lora_alpha"] == 4
  reloaded = peft.PeftModel.from_pretrained(torch_llama(), d).eval()
  ids = torch.tensor([[5, 7, 11, 13, 2, 3], [1, 2, 3, 4, 5, 6]])
  pm.set_adapter("lin")
  with torch.no_grad():
    want = pm(ids).logits.numpy()
    got = reloaded(ids).logits.numpy()
  # both are PyTorch float32 forwards of the same update stored two ways
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  back = jlora.peft.load(d, world["params"], model_type="llama")
  for k, dw in deltas(back).items():
    np.testing.assert_allclose(dw, deltas(composed)[k], rtol=1e-6, atol=1e-7)
  saved = jlora.load_adapter(jlora.save_adapter(str(tmp_path / "jlora"), composed), world["params"])
  for (_, w), (_, o) in zip(jax.tree_util.tree_flatten_with_path(saved, is_leaf=_is_lw)[0],
                            jax.tree_util.tree_flatten_with_path(composed, is_leaf=_is_lw)[0]):
    if _is_lw(w):
      assert w.spec == o.spec
      np.testing.assert_array_equal(w.a, o.a)


def test_weights_can_be_differentiated(world):
  adapters = world["adapters"]
  x = jax.random.normal(jax.random.key(0), (3, 32))

  def f(weights):
    tree = jlora.compose(adapters, weights, method="cat")
    return jnp.sum(jlora.wrap(lambda p, x: x @ p["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"])(tree, x))

  w = jnp.asarray(WEIGHTS)
  g = jax.grad(f)(w)
  # linear in each weight: the gradient is each adapter's own contribution, x·ΔW_i summed
  q = "model.layers.0.self_attn.q_proj"
  want = [np.sum(np.asarray(x, np.float64) @ deltas(ad)[q].T) for ad in adapters]
  np.testing.assert_allclose(g, want, rtol=1e-4)


def test_errors(world):
  ads = world["adapters"]
  rank4 = jlora.init(jax.random.key(0), world["params"], jlora.LoraConfig(rank=4, targets=".*/(q_proj|up_proj)/kernel"))
  with pytest.raises(ValueError, match=r"same rank at 'model/layers/0/mlp/up_proj/kernel'; found ranks \[4, 6\]"):
    jlora.compose([rank4, ads[1]], [1, 1], method="linear")
  with pytest.raises(ValueError, match="method must be one of"):
    jlora.compose(ads, WEIGHTS, method="average")
  with pytest.raises(ValueError, match="3 weights for 2 adapters"):
    jlora.compose(ads[:2], WEIGHTS, method="cat")
  with pytest.raises(ValueError, match=r"method='ties' needs density="):
    jlora.compose(ads, WEIGHTS, method="ties")
  with pytest.raises(ValueError, match="density= is only used by"):
    jlora.compose(ads, WEIGHTS, method="cat", density=0.5)
  with pytest.raises(ValueError, match="rank= is a positive integer for the SVD methods only"):
    jlora.compose(ads, WEIGHTS, method="linear", rank=4)
  with pytest.raises(ValueError, match="majority_sign must be"):
    jlora.compose(ads, WEIGHTS, method="ties", density=0.5, majority_sign="most")
  with pytest.raises(ValueError, match=r"rank=40 exceeds min\(fan_in, fan_out\) = 32"):
    jlora.compose(ads, WEIGHTS, method="svd", rank=40)
  other = jlora.init(jax.random.key(0), jax.tree.map(lambda x: x + 1, world["params"]),
                     jlora.LoraConfig(rank=4, targets=".*/q_proj/kernel"))
  with pytest.raises(ValueError, match=r"adapters\[1\] was trained on another base"):
    jlora.compose([ads[0], other], [1, 1], method="cat")


def test_peft_and_jlora_directories_into_bank_slots(world, tmp_path):
  bank = jlora.multi.load_bank(world["dirs"], world["params"], slots=4, model_type="llama")
  assert jlora.multi.slots(bank) == [0, 1, 2]
  for i in range(3):
    got, want = deltas(jlora.multi.unstack(bank, i)), peft_deltas(world["pm"], f"a{i}")
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)
  d = jlora.save_adapter(str(tmp_path / "a2"), world["adapters"][2])
  bank = jlora.multi.put_directory(bank, 3, d)
  for k, dw in deltas(jlora.multi.unstack(bank, 3)).items():
    np.testing.assert_allclose(dw, peft_deltas(world["pm"], "a2")[k], rtol=1e-6, atol=1e-7)
  with pytest.raises(FileNotFoundError, match="no adapter directory"):
    jlora.multi.load(str(tmp_path / "missing"), world["params"])
