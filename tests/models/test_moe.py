"""Mixture-of-experts families against PyTorch transformers 4.57.6, part 1: logits and router choices, both
dispatches, the load-balancing loss, packing, LoRA on experts, the conventions the expert-LoRA code builds on
(layouts, module names, targets), layer groups and configuration errors. (Part 2, tests/models/test_moe_io.py:
generation, save, MXFP4, a missing expert tensor.)"""

from __future__ import annotations

import dataclasses
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jlora
import jlora.models
from families import IDS, MOE_FAMILIES, lora_init
from helpers import oracle_params
from jlora.models.groups import layer_groups
from jlora.models.moe import resolve_dispatch, route

NAMES = list(MOE_FAMILIES)
PAD_MASK = np.ones_like(IDS)
PAD_MASK[0, 9:] = 0  # row 0 right-padded, row 1 left-padded
PAD_MASK[1, :4] = 0
PAD_POS = np.maximum(np.cumsum(PAD_MASK, 1) - 1, 0)


def _rel_err(got, want) -> float:
  want = np.asarray(want, np.float64)
  return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def _torch_run(f, mask=None):
  """transformers' logits, its router logits ``(L_moe, B, T, E)`` (gpt-oss: the raw ``x W + b``, read by hooks)
  and its chosen experts ``(L_moe, B, T, k)`` (sorted), with ``mask`` and its positions (as generate counts them)."""
  tm = f.torch_model
  kw = {} if mask is None else dict(attention_mask=torch.as_tensor(mask),
                                     position_ids=torch.as_tensor(np.maximum(np.cumsum(mask, 1) - 1, 0)))
  raw, hooks = [], []
  if f.name == "gpt_oss":
    hooks = [layer.mlp.router.register_forward_hook(lambda m, i, o: raw.append(
        torch.nn.functional.linear(i[0].reshape(-1, m.hidden_dim), m.weight, m.bias))) for layer in tm.model.layers]
  try:
    with torch.no_grad():
      out = tm(torch.as_tensor(IDS), output_router_logits=True, **kw)
  finally:
    for h in hooks:
      h.remove()
  b, t = IDS.shape
  k = tm.config.num_experts_per_tok
  recorded = np.stack([r.float().numpy() for r in out.router_logits])
  recorded = recorded.reshape(len(recorded), b, t, recorded.shape[-1])
  if f.name == "gpt_oss":  # recorded: the router scores (top-k softmax scattered); their support is the choice
    logits = np.stack([r.numpy() for r in raw]).reshape(recorded.shape)
    chosen = np.sort(np.argsort(-recorded, axis=-1, kind="stable")[..., :k], axis=-1)
    assert ((recorded > 0).sum(-1) == k).all()
  else:  # MixtralSparseMoeBlock / Qwen*SparseMoeBlock: topk of the float32 softmax
    logits = recorded
    probs = torch.softmax(torch.as_tensor(recorded), dim=-1, dtype=torch.float)
    chosen = np.sort(torch.topk(probs, k, dim=-1).indices.numpy(), axis=-1)
  return out.logits.numpy(), logits, chosen, out


def _chosen(f, router_logits) -> np.ndarray:
  lead = router_logits.shape[:-1]
  _, experts = route(jnp.asarray(router_logits).reshape(-1, router_logits.shape[-1]), f.model.config)
  return np.sort(np.asarray(experts).reshape(*lead, -1), axis=-1)


@pytest.mark.parametrize("name", NAMES)
def test_float32_logits_and_router_choices_match_transformers(family, name):
  f = family(name)
  cfg = f.model.config
  # The fixture is free of top-k ties (jax.lax.top_k and torch.topk break them differently): the k-th and
  # (k+1)-th logits of every token differ by far more than float32 summation order moves them (~1e-6).
  want, want_router, want_chosen, _ = _torch_run(f)
  top = -np.sort(-want_router, axis=-1)
  assert (top[..., cfg.num_experts_per_tok - 1] - top[..., cfg.num_experts_per_tok]).min() > 2e-3
  logits, router = f.routed(f.params, jnp.asarray(IDS), attention_mask=jnp.ones_like(jnp.asarray(IDS)))
  assert router.shape == (sum(cfg.moe_layers), *IDS.shape, cfg.num_experts) and router.dtype == jnp.float32
  assert _rel_err(logits, want) < 1e-4
  assert _rel_err(router, want_router) < 1e-4
  np.testing.assert_array_equal(_chosen(f, np.asarray(router)), want_chosen)  # the same experts for every token
  # Padded rows (left and right), on the real tokens.
  want, want_router, want_chosen, _ = _torch_run(f, PAD_MASK)
  logits, router = f.routed(f.params, jnp.asarray(IDS), attention_mask=jnp.asarray(PAD_MASK))
  real = PAD_MASK.astype(bool)
  assert _rel_err(np.asarray(logits)[real], want[real]) < 1e-4
  assert _rel_err(np.asarray(router)[:, real], want_router[:, real]) < 1e-4
  np.testing.assert_array_equal(_chosen(f, np.asarray(router))[:, real], want_chosen[:, real])


@pytest.mark.parametrize("name", ["qwen2_moe", "gpt_oss"])  # both expert MLPs, the shared expert, layer groups
def test_ragged_and_dense_dispatch_give_the_same_logits(family, name):
  f = family(name)
  assert resolve_dispatch("auto") == ("dense" if jax.default_backend() == "cpu" else "ragged")
  ragged = dataclasses.replace(f.model, moe_dispatch="ragged")
  dense = dataclasses.replace(f.model, moe_dispatch="dense")
  ids, ones = jnp.asarray(IDS), jnp.ones_like(jnp.asarray(IDS))
  got = jax.jit(lambda p: ragged(p, ids, attention_mask=ones, return_router_logits=True))(f.params)
  want = (f.routed(f.params, ids, attention_mask=ones) if resolve_dispatch("auto") == "dense"  # compiled already
          else jax.jit(lambda p: dense(p, ids, attention_mask=ones, return_router_logits=True))(f.params))
  np.testing.assert_array_equal(got[1], want[1])  # the routers see the same inputs
  # Same products, summed in another order (sorted groups vs all experts): float32 rounding only.
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5 * np.abs(want[0]).max())


# -- the load-balancing loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("experts,top_k", [(8, 2), (16, 4)])
def test_load_balancing_loss_equals_transformers_function(experts, top_k):
  from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

  rng = np.random.default_rng(experts)
  logits = rng.normal(size=(3, 2, 5, experts)).astype(np.float32)
  mask = np.ones((2, 5), np.int64)
  mask[0, 3:] = 0
  mask[1, :1] = 0
  gate = tuple(torch.as_tensor(layer.reshape(-1, experts)) for layer in logits)
  for m in (None, mask):
    want = load_balancing_loss_func(gate, experts, top_k, None if m is None else torch.as_tensor(m)).item()
    got = float(jlora.models.load_balancing_loss(jnp.asarray(logits), top_k, attention_mask=m))
    assert abs(got - want) < 1e-6 * want, (m is not None, got, want)
  with pytest.raises(ValueError, match=r"top_k must be in \[1, 8\]"):
    jlora.models.load_balancing_loss(jnp.asarray(logits[..., :8]), 9)


@pytest.mark.parametrize("name", ["qwen2_moe", "gpt_oss"])  # MoE layers among dense ones; gpt-oss' router scores
def test_aux_loss_of_a_padded_batch_equals_transformers(family, name):
  f = family(name)
  k = f.model.config.num_experts_per_tok
  _, _, _, out = _torch_run(f, PAD_MASK)
  _, router = f.routed(f.params, jnp.asarray(IDS), attention_mask=jnp.asarray(PAD_MASK))
  if name == "gpt_oss":  # transformers' gpt-oss records the router scores; its aux_loss is the loss of those
    top, experts = jax.lax.top_k(router, k)
    router = jnp.sum(jax.nn.one_hot(experts, router.shape[-1]) * jax.nn.softmax(top, axis=-1)[..., None], axis=-2)
  got = float(jlora.models.load_balancing_loss(router, k, attention_mask=jnp.asarray(PAD_MASK)))
  assert abs(got - out.aux_loss.item()) < 1e-5 * out.aux_loss.item()


# -- packing, LoRA, conventions, errors ---------------------------------------------------------------------------


def test_packed_examples_do_not_see_each_other(family):
  f = family("gpt_oss")  # sinks, sliding/full layers, router bias
  lengths = [5, 4, 3]
  segments = jnp.asarray(np.repeat(np.arange(1, 4), lengths)[None].repeat(2, 0))
  packed, _ = f.routed(f.params, jnp.asarray(IDS), segment_ids=segments)
  starts = np.cumsum([0, *lengths[:-1]])
  alone_ids = np.zeros((2, 12), IDS.dtype)
  alone_mask = np.zeros((2, 12), np.int32)
  for j, (s, n) in enumerate(zip(starts, lengths)):  # each example alone in its own (right-padded) row: 2 rows each
    alone_ids[:, :n] = IDS[:, s:s + n]
    alone_mask[:, :n] = 1
    alone, _ = f.routed(f.params, jnp.asarray(alone_ids), attention_mask=jnp.asarray(alone_mask))
    want = np.asarray(alone)[:, :n]
    np.testing.assert_allclose(np.asarray(packed)[:, s:s + n], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    alone_ids[:] = 0
    alone_mask[:] = 0


def test_lora_on_experts_through_the_dense_dispatch_equals_the_merged_model(family):
  f = family("qwen2_moe")  # experts, shared expert and dense MLPs, scanned as one group of period 2
  lp = lora_init(f, jlora.LoraConfig(rank=2, alpha=4, targets=f.model.targets("all-linear")), scale=0.2)
  a = jlora._checkpoint.adapter_weights(lp)["layers/mlp/experts/gate_proj/kernel"].a
  assert a.shape == (2, 8, 32, 2)  # (MoE layers, experts, in, r): one adapter per expert
  ids, ones = jnp.asarray(IDS), jnp.ones_like(jnp.asarray(IDS))
  got = np.asarray(jax.jit(jlora.wrap(dataclasses.replace(f.model, moe_dispatch="dense")))(lp, ids))
  plain = lambda params: f.routed(params, ids, attention_mask=ones)[0]  # CPU: the dense dispatch, compiled already
  assert _rel_err(got, plain(f.params)) > 1e-2
  assert _rel_err(got, plain(oracle_params(lp))) < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_layouts_module_names_and_targets(family, name):
  f = family(name)
  cfg, layout, mm = f.model.config, f.model.layout, f.model.module_map
  # Which layers are sparse: what transformers built.
  assert list(cfg.moe_layers) == [not hasattr(layer.mlp if hasattr(layer, "mlp") else layer.block_sparse_moe,
                                              "gate_proj") for layer in f.torch_model.model.layers]
  experts = [p for p in layout if p.startswith("layers/mlp/experts/") and p.endswith("/kernel")]
  assert experts and all(layout[p] == jlora.KernelLayout(in_axes=(2,), batch_axes=(0, 1)) for p in experts)
  assert layout["layers/mlp/router/kernel"] == jlora.KernelLayout(in_axes=(1,), batch_axes=(0,))
  assert jlora.infer_layout(f.model, f.params, jnp.asarray(IDS[:, :4])) == layout  # what the forward does
  # Every slice of every kernel names a module of the transformers model (gpt-oss' 3-D experts: a parameter).
  modules = dict(f.torch_model.named_modules())
  torch_params = dict(f.torch_model.named_parameters())
  for path, lay in layout.items():
    leaf = f.params
    for key in path.split("/"):
      leaf = leaf[key]
    stacked = [leaf.shape[ax] for ax in lay.batch_axes]
    if path.startswith("layers/mlp/experts/") and name == "gpt_oss":
      stacked = stacked[:1]
    for index in np.ndindex(*stacked):
      target = mm.to_module(path, index)
      assert target in modules or target in torch_params, (path, index, target)
  if name == "mixtral":
    assert mm.to_module("layers/mlp/experts/up_proj/kernel", (2, 5)) == "model.layers.2.block_sparse_moe.experts.5.w3"
  if name == "gpt_oss":
    assert mm.to_module("layers/mlp/experts/gate_up_proj/kernel", (1,)) == "model.layers.1.mlp.experts.gate_up_proj"
    with pytest.raises(ValueError, match="no module per expert"):
      mm.to_module("layers/mlp/experts/gate_up_proj/kernel", (1, 0))
  # all-linear: the projections and the experts, not the routers (named, they are adapted).
  all_linear = f.model.targets("all-linear").split("|")
  assert set(all_linear) == {p for p in layout if "embed" not in p and "lm_head" not in p and "router" not in p
                             and "shared_expert_gate" not in p}
  assert f.model.targets("router") == ".*/(router)/kernel"


def test_layer_groups_tile_the_layers_with_periodic_groups():
  rng = random.Random(0)
  for _ in range(200):
    kinds = [rng.random() < 0.6 for _ in range(rng.randint(1, 24))]
    groups = layer_groups(kinds)
    assert groups[0].start == 0 and groups[-1].stop == len(kinds)
    assert all(a.stop == b.start for a, b in zip(groups, groups[1:]))
    for g in groups:
      assert (g.stop - g.start) % g.period == 0
      assert all(kinds[i] == kinds[g.start + (i - g.start) % g.period] for i in range(g.start, g.stop))
    assert sum(g.period for g in groups) <= len(kinds)
  assert [(g.period, g.repeats) for g in layer_groups([False, True] * 12)] == [(2, 12)]
  assert [(g.period, g.repeats) for g in layer_groups([False] * 3 + [True] * 45)] == [(1, 3), (1, 45)]


def test_bad_moe_configurations_are_errors_that_name_them():
  base = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4}
  with pytest.raises(ValueError, match=r"num_experts_per_tok \(9\) is larger than num_local_experts \(8\)"):
    jlora.models.ModelConfig.from_hf({"model_type": "mixtral", **base, "num_local_experts": 8,
                                      "num_experts_per_tok": 9})
  with pytest.raises(ValueError, match=r"num_experts_per_tok \(5\) is larger than num_experts \(4\)"):
    jlora.models.ModelConfig.from_hf({"model_type": "qwen3_moe", **base, "num_experts": 4, "num_experts_per_tok": 5})
  with pytest.raises(ValueError, match="use_sliding_window with qwen2_moe is not supported"):
    jlora.models.ModelConfig.from_hf({"model_type": "qwen2_moe", **base, "use_sliding_window": True})
  moe = jlora.models.ModelConfig.from_hf({"model_type": "mixtral", **base, "num_local_experts": 4})
  with pytest.raises(ValueError, match="Decoder.moe_dispatch must be one of"):
    jlora.models.Decoder(moe, moe_dispatch="sorted")
  dense = jlora.models.Decoder(jlora.models.ModelConfig.from_hf({"model_type": "llama", **base}))
  params = dense.shapes()  # the check comes first: no weights needed
  with pytest.raises(ValueError, match="return_router_logits: this llama model has no mixture-of-experts layers"):
    dense(params, jnp.ones((1, 2), jnp.int32), return_router_logits=True)
