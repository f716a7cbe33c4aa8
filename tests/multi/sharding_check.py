"""A bank trained (loss, multi-tenant gradients) on 8 fake CPU devices; test_sharding_bank.py runs it.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multi/sharding_check.py
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import jlora
import jlora.sharding as jsh

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import randomize  # noqa: E402


def main():
  assert jax.device_count() == 8
  import transformers

  cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=256, max_position_embeddings=32)
  model = transformers.FlaxLlamaForCausalLM(cfg, _do_init=False)
  params = jax.jit(model.init_weights, static_argnums=1)(jax.random.key(0), (1, 1))
  fwd = lambda p, ids: model(ids, params=p).logits
  targets = [r".*/(q_proj|v_proj|down_proj)/kernel", r".*/(q_proj|k_proj|o_proj|gate_proj|up_proj)/kernel"]
  adapters = [randomize(jlora.init(jax.random.key(i), params, jlora.LoraConfig(rank=r, targets=t)),
                        jax.random.key(10 + i), scale=0.1) for i, (r, t) in enumerate(zip((4, 8), targets))]
  bank = jlora.stack(adapters, slots=4)
  ids = jax.random.randint(jax.random.key(1), (8, 16), 0, 256)
  adapter_ids = jnp.array([0, 1, -1, 1, 0, 0, 2, 1])

  def loss(a, frozen, ids, adapter_ids):
    logits = jlora.wrap(fwd)(jlora.combine(a, frozen), ids, adapter_ids=adapter_ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

  step = jax.jit(jax.value_and_grad(loss))  # the serving forward is the loss's forward
  ref_loss, ref_grad = step(*jlora.split(bank), ids, adapter_ids)

  mesh = jsh.make_mesh("data=2,fsdp=2,tensor=2")
  base_specs = jsh.partition_specs(params, jsh.preset_rules("fsdp_tp"), mesh=mesh)
  sharded = jsh.put(bank, jsh.lora_specs(bank, base_specs), mesh)
  q = sharded["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
  # q_proj is column-parallel P(fsdp, tensor): A (slot, in, r) -> P(None, fsdp, None),
  # B (slot, r, out) -> P(None, None, tensor)
  assert q.a.sharding.spec == P(None, "fsdp", None) and q.b.sharding.spec == P(None, None, "tensor"), q
  assert q.factors["scales"].sharding.spec == P(None)
  batch = NamedSharding(mesh, P(jsh.DATA_AXES, None))
  sids = jax.device_put(ids, batch)
  s_adapter_ids = jax.device_put(adapter_ids, NamedSharding(mesh, P(jsh.DATA_AXES)))
  s_loss, s_grad = step(*jlora.split(sharded), sids, s_adapter_ids)
  # the same math with sums split over devices in another order: float32 reassociation only
  np.testing.assert_allclose(float(s_loss), float(ref_loss), rtol=1e-5)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(s_grad), jax.tree.leaves(ref_grad)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6, err_msg=str(path))
  g = s_grad["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
  assert isinstance(g.a.sharding, NamedSharding) and g.a.sharding.mesh.shape == mesh.shape
  print("OK")


if __name__ == "__main__":
  main()
