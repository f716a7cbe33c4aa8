"""Sharding checks run in a subprocess with 8 fake CPU devices (see test_sharding.py).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding/checks.py TMPDIR NAME...

Each check runs in turn (one process: one start-up, shared compilations); each prints
"NAME OK" or "NAME FAILED" and its traceback, and the exit status is 1 if any failed.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import jlora
import jlora.sharding as jsh

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import randomize  # noqa: E402


def llama():
  import transformers

  cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=256, max_position_embeddings=32)
  model = transformers.FlaxLlamaForCausalLM(cfg, seed=0)
  return model, model.params, (lambda p, ids: model(ids, params=p).logits)


TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"


def check_sharded_init(tmp):
  assert jax.device_count() == 8
  model, params, fwd = llama()
  mesh = jsh.make_mesh("fsdp=2,tensor=4")
  base = jsh.put(params, jsh.partition_specs(params, jsh.preset_rules("fsdp_tp"), mesh=mesh), mesh)
  cfg = jlora.LoraConfig(rank=8, targets=TARGETS)
  lp = jsh.init_sharded(jax.random.key(0), base, cfg, mesh)
  q = lp["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
  o = lp["model"]["layers"]["0"]["self_attn"]["o_proj"]["kernel"]
  # q_proj is column-parallel P(fsdp, tensor): A (in, r) -> P(fsdp, None), B (r, out) -> P(None, tensor).
  assert q.w0.sharding.spec == P("fsdp", "tensor"), q.w0.sharding
  assert q.a.sharding.spec == P("fsdp", None) and q.b.sharding.spec == P(None, "tensor")
  assert o.a.sharding.spec == P("tensor", None) and o.b.sharding.spec == P(None, "fsdp")
  assert q.a.addressable_shards[0].data.shape == (32, 8) and q.b.addressable_shards[0].data.shape == (8, 16)
  assert q.w0 is base["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]  # base attached, not copied
  # Same values as an unsharded init with the same key.
  ref = jlora.init(jax.random.key(0), params, cfg)
  np.testing.assert_array_equal(np.asarray(q.a), np.asarray(ref["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].a))
  # The replicate policy.
  a_spec, b_spec = jsh.factor_specs(q.spec, P("fsdp", "tensor"), "replicate")
  assert a_spec == P(None, None) and b_spec == P(None, None)
  # Every parameter needs a rule.
  try:
    jsh.partition_specs(params, [(r".*/kernel", P())])
  except ValueError as e:
    assert "match no sharding rule" in str(e) and "embed_tokens/embedding" in str(e)
  else:
    raise AssertionError("unmatched parameters were not reported")
  try:
    jsh.partition_specs({"w": jnp.ones((6, 4))}, [(r".*", P("tensor"))], mesh=jsh.make_mesh("tensor=8"))
    raise AssertionError("non-divisible axis accepted")
  except ValueError as e:
    assert "does not split over mesh axes" in str(e), e


def _train(lp, fwd, ids, steps=2):
  adapters, frozen = jlora.split(lp)
  tx = jlora.optimizer(optax.sgd(0.5), adapters)  # linear in the gradient: no Adam sign amplification
  state = tx.init(adapters)
  wrapped = jlora.wrap(fwd)

  @jax.jit
  def step(adapters, state, ids):
    def loss(a):
      logits = wrapped(jlora.combine(a, frozen), ids)
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()
    l, g = jax.value_and_grad(loss)(adapters)
    u, state = tx.update(g, state, adapters)
    return optax.apply_updates(adapters, u), state, l

  for _ in range(steps):
    adapters, state, l = step(adapters, state, ids)
  return jlora.combine(adapters, frozen), float(l)


def check_sharded_step_matches_single_device(tmp):
  model, params, fwd = llama()
  cfg = jlora.LoraConfig(rank=8, targets=TARGETS)
  ids = jax.random.randint(jax.random.key(1), (8, 16), 0, 256)
  ref, ref_loss = _train(jlora.init(jax.random.key(0), params, cfg), fwd, ids)
  for preset, shape in (("fsdp", "fsdp=8"), ("tp", "data=2,tensor=4"), ("fsdp_tp", "data=2,fsdp=2,tensor=2")):
    mesh = jsh.make_mesh(shape)
    base = jsh.put(params, jsh.partition_specs(params, jsh.preset_rules(preset), mesh=mesh), mesh)
    lp = jsh.init_sharded(jax.random.key(0), base, cfg, mesh)
    sids = jax.device_put(ids, NamedSharding(mesh, P(jsh.DATA_AXES, None)))
    out, loss = _train(lp, fwd, sids)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for (pa, x), (pb, y) in zip(jax.tree_util.tree_leaves_with_path(out), jax.tree_util.tree_leaves_with_path(ref)):
      # Same math, sums split over devices in another order: float32 reassociation only.
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6, err_msg=f"{preset} {pa}")
    w = out["model"]["layers"]["1"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(w.a.sharding, NamedSharding) and w.a.sharding.mesh.shape == mesh.shape


def check_sharded_merge(tmp):
  model, params, fwd = llama()
  mesh = jsh.make_mesh("fsdp=2,tensor=4")
  specs = jsh.partition_specs(params, jsh.preset_rules("fsdp_tp"), mesh=mesh)
  base = jsh.put(params, specs, mesh)
  lp = randomize(jsh.init_sharded(jax.random.key(0), base, jlora.LoraConfig(rank=8, targets=TARGETS), mesh),
                 jax.random.key(2), scale=0.1)
  merged = jax.jit(jlora.merge, out_shardings=jsh.named(specs, mesh))(lp)
  ref = jlora.merge(jax.device_get(lp))
  for x, y, s in zip(jax.tree.leaves(merged), jax.tree.leaves(ref), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
    assert x.sharding.spec == s
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
  ids = jnp.arange(32).reshape(2, 16) % 256
  np.testing.assert_allclose(np.asarray(jax.jit(fwd)(merged, ids)), np.asarray(jax.jit(jlora.wrap(fwd))(lp, ids)),
                             rtol=1e-4, atol=1e-4)


def check_checkpoint_onto_other_mesh(tmp):
  model, params, fwd = llama()
  cfg = jlora.LoraConfig(rank=8, targets=TARGETS)
  mesh_a = jsh.make_mesh("fsdp=2,tensor=4")
  base_a = jsh.put(params, jsh.partition_specs(params, jsh.preset_rules("fsdp_tp"), mesh=mesh_a), mesh_a)
  lp = randomize(jsh.init_sharded(jax.random.key(0), base_a, cfg, mesh_a), jax.random.key(3))
  d = jlora.save_adapter(os.path.join(tmp, "adapter"), lp, base_model="tiny-llama")
  mesh_b = jsh.make_mesh("data=2,fsdp=4")
  base_b = jsh.put(params, jsh.partition_specs(params, jsh.preset_rules("fsdp"), mesh=mesh_b), mesh_b)
  back = jlora.load_adapter(d, base_b)
  q = back["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
  assert q.w0.sharding.spec == P("fsdp", None)
  assert q.a.sharding.spec == P("fsdp", None) and q.b.sharding.spec == P(None, None)
  assert q.a.sharding.mesh.shape == mesh_b.shape
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(lp)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def check_native_load_onto_mesh(tmp):
  """jlora.models.load places each stacked parameter directly; a LoRA step matches one device."""
  import jlora.models

  cfg = jlora.models.ModelConfig.from_hf({
      "model_type": "qwen2", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4})
  model = jlora.models.Decoder(cfg)
  d = jlora.models.save(os.path.join(tmp, "native"), model, model.init(jax.random.key(0)))
  model, params = jlora.models.load(d)
  lcfg = jlora.LoraConfig(rank=8, targets=model.targets("all-linear"))
  fwd = lambda p, x: model(p, x)
  ids = jax.random.randint(jax.random.key(1), (8, 16), 0, 256)
  ref, ref_loss = _train(jlora.init(jax.random.key(0), params, lcfg, layout=model.layout), fwd, ids)
  for preset, shape in (("fsdp", "fsdp=8"), ("fsdp_tp", "data=2,fsdp=2,tensor=2")):
    mesh = jsh.make_mesh(shape)
    _, base = jlora.models.load(d, mesh=mesh, sharding=preset)
    q = base["layers"]["self_attn"]["q_proj"]
    fs = "fsdp" if preset == "fsdp_tp" or preset == "fsdp" else None
    # The layer axis is never split: the scan slices whole layers.
    assert q["kernel"].sharding.spec == (P(None, "fsdp", None) if preset == "fsdp" else P(None, fs, "tensor"))
    if preset == "fsdp_tp":
      assert q["bias"].sharding.spec == P(None, "tensor")
      assert base["layers"]["mlp"]["down_proj"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
      assert base["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")
    lp = jsh.init_sharded(jax.random.key(0), base, lcfg, mesh, layout=model.layout)
    out, loss = _train(lp, fwd, jax.device_put(ids, NamedSharding(mesh, P(jsh.DATA_AXES, None))))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def check_qlora_sharded_step_matches_single_device(tmp):
  """4-bit bases sharded like their kernels: the same QLoRA steps as on one device."""
  model, params, fwd = llama()
  cfg = jlora.LoraConfig(rank=8, targets=TARGETS)
  qp = jlora.quantize(params, targets=TARGETS)
  ids = jax.random.randint(jax.random.key(1), (8, 16), 0, 256)
  ref, ref_loss = _train(jlora.init(jax.random.key(0), qp, cfg), fwd, ids)
  for preset, shape in (("fsdp", "fsdp=8"), ("fsdp_tp", "data=2,fsdp=2,tensor=2")):
    mesh = jsh.make_mesh(shape)
    specs = jsh.partition_specs(qp, jsh.preset_rules(preset), mesh=mesh)
    base = jsh.put(qp, specs, mesh)
    q = base["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    # stored [out, in/2] codes take the kernel's (in, out) specs transposed
    want = P("fsdp", None) if preset == "fsdp" else P("fsdp", "tensor")
    assert q.kernel_spec() == want and q.packed.sharding.spec == P(*reversed(tuple(want))), q.packed.sharding
    assert q.packed.addressable_shards[0].data.shape[1] < q.packed.shape[1]
    lp = jsh.init_sharded(jax.random.key(0), base, cfg, mesh)
    w = lp["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert w.w0 is q and w.a.sharding.spec == P(want[0], None) and w.b.sharding.spec == P(None, want[1])
    sids = jax.device_put(ids, NamedSharding(mesh, P(jsh.DATA_AXES, None)))
    out, loss = _train(lp, fwd, sids)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for (pa, x), (pb, y) in zip(jax.tree_util.tree_leaves_with_path(out), jax.tree_util.tree_leaves_with_path(ref)):
      # Same decoded kernels and math, sums split over devices in another order: float32 reassociation only.
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6, err_msg=f"{preset} {pa}")
    # An adapter saved here loads onto the dense base (same fingerprint), on one device.
    d = jlora.save_adapter(os.path.join(tmp, f"q-{preset}"), out)
    jlora.load_adapter(d, params)

  # A scanned stack of (layers, in, out) kernels, sharded P(None, fsdp, tensor): decoded per layer.
  k = jax.random.split(jax.random.key(3), 2)
  stacked = {"w": jax.random.normal(k[0], (3, 128, 128)) / 12, "v": jax.random.normal(k[1], (3, 128, 64)) / 12}
  lay = {n: jlora.KernelLayout(in_axes=(1,), batch_axes=(0,)) for n in stacked}

  def body(h, w):
    return jnp.tanh(h @ w["w"]) + 0.1 * jnp.tanh(h @ w["v"]).mean(-1, keepdims=True), None

  sfwd = lambda p, x: jax.lax.scan(body, x, p)[0]
  sq = jlora.quantize(stacked, targets=".*", layout=lay)
  scfg = jlora.LoraConfig(rank=4, targets="w")
  x = jax.random.normal(jax.random.key(4), (8, 128))
  lp1 = randomize(jlora.init(jax.random.key(0), sq, scfg, layout=lay), jax.random.key(5), scale=0.1)
  mesh = jsh.make_mesh("fsdp=4,tensor=2")
  specs = jsh.partition_specs(sq, [(".*", P(None, "fsdp", "tensor"))], mesh=mesh)
  base = jsh.put(sq, specs, mesh)
  assert base["w"].packed.sharding.spec == P(None, "tensor", "fsdp")
  assert base["w"].nested_offset.sharding.spec == P(None)
  lp8 = jsh.attach_base(jsh.put(jlora.split(lp1)[0], jsh.lora_specs(jlora.split(lp1)[0], jsh.specs_of(base)), mesh),
                        base)
  assert lp8["w"].a.sharding.spec == P(None, "fsdp", None) and lp8["w"].b.sharding.spec == P(None, None, "tensor")
  xs = jax.device_put(x, NamedSharding(mesh, P(jsh.DATA_AXES, None)))
  loss = lambda a, fr, x: jnp.mean(jlora.wrap(sfwd)(jlora.combine(a, fr), x) ** 2)
  g1 = jax.jit(jax.grad(loss))(*jlora.split(lp1), x)["w"]
  g8 = jax.jit(jax.grad(loss))(*jlora.split(lp8), xs)["w"]
  for a, b in ((g8.a, g1.a), (g8.b, g1.b)):  # float32 reassociation across devices only
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))


def check_finetune_step_compiles_once(tmp):
  """On a mesh the fine-tuning step and the evaluation compile once each: the step's outputs keep
  the shardings of its inputs (they used to drift, and every drift recompiled the step)."""
  import logging

  from jlora.finetune import TrainConfig, run

  compiled = []

  class Compiles(logging.Handler):
    def emit(self, record):
      compiled.append(record.getMessage().split(" with ")[0])

  handler = Compiles()
  logging.getLogger("jax").addHandler(handler)
  jax.config.update("jax_log_compiles", True)
  try:
    run(TrainConfig(output_dir=os.path.join(tmp, "run"), sharding="fsdp", steps=3, save_every=2, batch_size=8,
                    max_seq_len=24, rank=2, log_every=1, eval_every=1000, eval_exact_match=-1, progress=False,
                    reproducible=False))
  finally:
    jax.config.update("jax_log_compiles", False)
    logging.getLogger("jax").removeHandler(handler)
  assert compiled.count("Compiling jit(step)") == 1, compiled
  assert compiled.count("Compiling jit(eval_batch)") == 1, compiled  # before and after training


def check_finetune_qlora_on_mesh(tmp):
  """--quantize nf4 with a sharding preset: the 4-bit stored arrays are sharded like their kernels;
  a *-bnb-4bit checkpoint loads straight onto the mesh; a QLoRA run trains there."""
  import jlora.models
  from jlora.finetune import TrainConfig, run
  from jlora.finetune import model as model_lib
  from jlora.finetune.config import DEFAULT_MODEL
  from jlora.finetune.quantize import quantize_base

  mesh = jsh.make_mesh("data=2,fsdp=2,tensor=2")
  cfg = TrainConfig(quantize="nf4", sharding="fsdp_tp", mesh="data=2,fsdp=2,tensor=2")
  dense = model_lib.load(DEFAULT_MODEL)
  loaded = model_lib.load(DEFAULT_MODEL, mesh=mesh, sharding="fsdp_tp")
  qp, _ = quantize_base(cfg, loaded.params, loaded.layout, mesh, model_id="tiny")
  q = qp["layers"]["self_attn"]["q_proj"]["kernel"]
  # (layers, in, out) kernel P(None, fsdp, tensor): the (layers, out, in/2) codes are P(None, tensor, fsdp).
  assert q.kernel_spec() == P(None, "fsdp", "tensor") and q.packed.sharding.spec == P(None, "tensor", "fsdp")
  assert q.packed.addressable_shards[0].data.shape[1] < q.packed.shape[1]
  single, _ = quantize_base(cfg, dense.params, dense.layout, None, model_id="tiny")
  for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(qp), jax.tree_util.tree_leaves_with_path(single)):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype == np.uint8 and "absmax" not in jax.tree_util.keystr(path):  # the 4-bit codes: identical
      np.testing.assert_array_equal(x, y)
    elif x.dtype == np.uint8:  # 8-bit absmax codes: a sharded float32 reduction may move a code by one step
      assert np.abs(x.astype(int) - y.astype(int)).max() <= 1 and (x != y).mean() < 1e-3
    else:  # the double quantization's float32 statistics (means, maxima of sharded blocks): within an ulp
      np.testing.assert_allclose(x, y, rtol=2.4e-7, atol=0)
  # A *-bnb-4bit directory (written by jlora.models.save) loads onto the mesh with the same placement.
  d = jlora.models.save(os.path.join(tmp, "bnb"), dense.model, single)
  _, onto = jlora.models.load(d, mesh=mesh, sharding="fsdp_tp")
  q2 = onto["layers"]["self_attn"]["q_proj"]["kernel"]
  assert isinstance(q2, jlora.NF4Weight) and q2.packed.sharding.spec == q.packed.sharding.spec
  ids = jnp.asarray([[5, 7, 11, 13, 2, 3, 9, 1]] * 2)
  # The same bytes decoded in the same float32 math, sharded or not (only sums split over devices).
  np.testing.assert_allclose(np.asarray(jax.jit(jlora.wrap(dense.model))(onto, ids)),
                             np.asarray(jax.jit(jlora.wrap(dense.model))(single, ids)), rtol=1e-5, atol=1e-5)
  out = os.path.join(tmp, "run")
  summary = run(TrainConfig(output_dir=out, quantize="nf4", sharding="fsdp_tp", mesh="data=2,fsdp=2,tensor=2",
                            remat=True, steps=4, batch_size=4, max_seq_len=24, rank=4, lr=1e-2, warmup_steps=1,
                            eval_exact_match=-1, eval_every=1000, progress=False, reproducible=False))
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
  jlora.load_adapter(os.path.join(out, "adapter"), dense.params)  # onto the dense base, on one device


def check_expert_parallel_step_matches_single_device(tmp):
  """Routed experts on an `expert` mesh axis (with data, fsdp and tensor splits too): the expert
  adapters' loss, gradients and one optimizer step equal one device's."""
  from experts.moe_fns import adapters as make_adapters, decoder, init_params, inputs

  p = init_params(0, experts=4, hidden=16, inter=8)
  x = inputs(1, (4, 3, 16))
  cfg = jlora.LoraConfig(rank=2, targets=r"layers/(mlp/experts/.*|self_attn/q_proj)/kernel")
  lp = make_adapters(2, p, cfg, scale=0.1)
  adapters, frozen = jlora.split(lp)
  tx = jlora.optimizer(optax.sgd(0.5), adapters)
  wrapped = jlora.wrap(decoder)

  def step(adapters, frozen, x):
    loss = lambda a: jnp.mean(jnp.square(wrapped(jlora.combine(a, frozen), x)))
    l, g = jax.value_and_grad(loss)(adapters)
    u, _ = tx.update(g, tx.init(adapters), adapters)
    return l, g, optax.apply_updates(adapters, u)

  ref = jax.jit(step)(adapters, frozen, x)
  for preset, shape in (("fsdp_tp", "expert=4,data=2"), ("fsdp_tp", "expert=2,fsdp=2,tensor=2"), ("fsdp", "expert=8")):
    if shape == "expert=8":  # 4 experts do not split over 8 devices: the error says so
      try:
        jsh.partition_specs(p, jsh.preset_rules(preset), mesh=jsh.make_mesh(shape))
      except ValueError as e:
        assert "/experts/" in str(e) and "does not split over mesh axes 'expert'" in str(e), e
        continue
      raise AssertionError("4 experts were split over 8 devices")
    mesh = jsh.make_mesh(shape)
    specs = jsh.lora_specs(lp, jsh.partition_specs(p, jsh.preset_rules(preset), mesh=mesh))
    up = specs["layers"]["mlp"]["experts"]["up_proj"]["kernel"]
    assert up.w0 == P(None, "expert", "fsdp", "tensor") and up.a == P(None, "expert", "fsdp", None), up
    assert up.b == P(None, "expert", None, "tensor"), up
    down = specs["layers"]["mlp"]["experts"]["down_proj"]["kernel"]
    assert down.a == P(None, "expert", "tensor", None) and down.b == P(None, "expert", None, "fsdp"), down
    on = jsh.put(lp, specs, mesh)
    a_on, f_on = jlora.split(on)
    w = a_on["layers"]["mlp"]["experts"]["up_proj"]["kernel"]
    assert w.a.addressable_shards[0].data.shape[1] == 4 // mesh.shape["expert"]  # each device: its experts' adapters
    sx = jax.device_put(x, NamedSharding(mesh, P(jsh.DATA_AXES)))
    got = jax.jit(step)(a_on, f_on, sx)
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-5)
    for (pa, u), (_, v) in zip(jax.tree_util.tree_leaves_with_path(got[1:]), jax.tree_util.tree_leaves_with_path(ref[1:])):
      np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6, err_msg=f"{shape} {pa}")


if __name__ == "__main__":
  import traceback

  failed = False
  for name in sys.argv[2:]:
    tmp = os.path.join(sys.argv[1], name)
    os.makedirs(tmp, exist_ok=True)
    start = time.perf_counter()
    try:
      globals()[f"check_{name}"](tmp)
    except Exception:
      failed = True
      print(f"{name} FAILED\n{traceback.format_exc()}", flush=True)
    else:
      print(f"{name} OK ({time.perf_counter() - start:.1f} s)", flush=True)
  sys.exit(1 if failed else 0)
