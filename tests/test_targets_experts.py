"""``--targets`` on mixtures of experts: all-linear never adapts a router, expert names cannot miss
silently, the count line shows routed experts, shared experts and attention apart."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import pytest

import jlora
from jlora._targets import expand_targets, expand_targets_with_notes, kernel_kind

# jlora.models' conventions (Qwen2-MoE: a shared expert and its gate).
NATIVE = ["embed_tokens/embedding", "layers/self_attn/q_proj/kernel", "layers/self_attn/o_proj/kernel",
          "layers/mlp/router/kernel", "layers/mlp/experts/gate_proj/kernel", "layers/mlp/experts/up_proj/kernel",
          "layers/mlp/experts/down_proj/kernel", "layers/mlp/shared_expert/gate_proj/kernel",
          "layers/mlp/shared_expert/up_proj/kernel", "layers/mlp/shared_expert/down_proj/kernel",
          "layers/mlp/shared_expert_gate/kernel", "lm_head/kernel"]
# transformers' module names (Mixtral): the router is `gate`, the experts w1/w2/w3.
HF = ["model/layers/0/self_attn/q_proj/kernel", "model/layers/0/block_sparse_moe/gate/kernel",
      "model/layers/0/block_sparse_moe/experts/0/w1/kernel", "model/layers/0/block_sparse_moe/experts/0/w2/kernel"]


def test_kinds():
  kinds = [kernel_kind(p, NATIVE) for p in NATIVE]
  assert kinds == ["other", "attention", "attention", "router", "routed expert", "routed expert", "routed expert",
                   "shared expert", "shared expert", "shared expert", "router", "other"]
  assert [kernel_kind(p, HF) for p in HF] == ["attention", "router", "routed expert", "routed expert"]
  assert kernel_kind("model/layers/0/mlp/gate/kernel", ["model/layers/0/mlp/gate/kernel"]) == "other"  # no experts


def test_all_linear_adapts_experts_and_shared_experts_never_a_router():
  got = expand_targets("all-linear", NATIVE).split("|")
  assert [p.replace("\\", "") for p in got] == [p for p in NATIVE if kernel_kind(p, NATIVE) not in ("router", "other")]
  hf = expand_targets("all-linear", HF).replace("\\", "").split("|")
  assert "model/layers/0/block_sparse_moe/gate/kernel" not in hf and len(hf) == 3
  # A router is adapted when named.
  assert expand_targets("router,q_proj", NATIVE) == ".*/(router|q_proj)/kernel"
  assert re.fullmatch(expand_targets("gate", HF), HF[1])


def test_expert_names_cannot_miss():
  regex = expand_targets("experts", NATIVE)
  assert sorted(p for p in NATIVE if re.fullmatch(regex, p)) == sorted(NATIVE[4:7])
  dense = ["layers/self_attn/q_proj/kernel", "layers/mlp/gate_proj/kernel"]
  with pytest.raises(ValueError, match=r"targets 'experts' name routed experts but reach none of this model's kernels: "
                                       r"it has no routed experts"):
    expand_targets("experts", dense)
  with pytest.raises(ValueError, match=r"targets '.\*/experts/w9/kernel' name routed experts but reach none of "
                                       r"tiny's routed expert kernels \(.*experts/0/w1/kernel"):
    expand_targets(".*/experts/w9/kernel", HF, model="tiny")


def test_a_rule_that_reaches_shared_experts_only_says_so_in_one_line():
  # Routed experts named w1/w2/w3 (transformers' Mixtral names) beside a shared expert named like Qwen's:
  paths = [p for p in NATIVE if "/experts/" not in p] + HF[2:]
  regex, notes = expand_targets_with_notes("gate_proj,up_proj,down_proj", paths)
  assert regex == ".*/(gate_proj|up_proj|down_proj)/kernel"
  assert notes == ["targets 'gate_proj,up_proj,down_proj' adapt shared experts only (3 kernels: "
                   "layers/mlp/shared_expert/gate_proj/kernel, layers/mlp/shared_expert/up_proj/kernel, "
                   "layers/mlp/shared_expert/down_proj/kernel), no routed expert; name the routed experts too "
                   "('experts' or 'all-linear') if you meant them."]
  with pytest.warns(jlora.TargetsNote, match=r"^targets 'gate_proj,up_proj,down_proj' adapt shared experts only"):
    expand_targets("gate_proj,up_proj,down_proj", paths)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert expand_targets_with_notes("all-linear", NATIVE)[1] == []
    expand_targets("experts,shared_expert", NATIVE)


def test_count_line_reports_routed_shared_and_attention_apart():
  p = {"layers": {"self_attn": {"q_proj": {"kernel": jnp.ones((2, 8, 8))}},
                  "mlp": {"router": {"kernel": jnp.ones((2, 8, 4))},
                          "experts": {"up_proj": {"kernel": jnp.ones((2, 4, 8, 6))}},
                          "shared_expert": {"up_proj": {"kernel": jnp.ones((2, 8, 6))}}}}}
  lay = {"layers/mlp/experts/up_proj/kernel": jlora.KernelLayout(batch_axes=(0, 1), in_axes=(2,))}
  lay.update({k: jlora.KernelLayout(batch_axes=(0,), in_axes=(1,)) for k in
              ("layers/self_attn/q_proj/kernel", "layers/mlp/router/kernel", "layers/mlp/shared_expert/up_proj/kernel")})
  attn_only = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=2, targets=".*/q_proj/kernel"), layout=lay)
  assert str(jlora.count(attn_only)).endswith("|| routed experts: 0, shared experts: 0, attention: 1 (64 params)")
  every = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=2, targets=expand_targets("all-linear", lay)),
                     layout=lay)
  c = jlora.count(every)
  # routed: A (2,4,8,2) + B (2,4,2,6) = 224; shared: (2,8,2) + (2,2,6) = 56; attention (2,8,2) + (2,2,8) = 64
  assert str(c).endswith("|| routed experts: 1 (224 params), shared experts: 1 (56 params), attention: 1 (64 params)")
  assert c.trainable == 224 + 56 + 64
  dense = jlora.init(jax.random.key(0), {"w": jnp.ones((8, 8))}, jlora.LoraConfig(rank=2, targets="w"))
  assert "routed" not in str(jlora.count(dense)) and jlora.count(dense).kinds == ()
