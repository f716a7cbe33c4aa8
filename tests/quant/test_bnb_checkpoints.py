"""Real bitsandbytes checkpoints: transformers quantizes a Llama on CPU (``BitsAndBytesConfig``, NF4 +
double quantization) and saves it as a ``*-bnb-4bit`` checkpoint; jlora reads and writes those
state dicts, and a QLoRA adapter trained in JAX loads with PEFT onto that 4-bit model."""

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
from jlora.quant import from_bnb, is_bnb_4bit, stack, to_bnb

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from bnb_reference import bnb  # noqa: E402  (bitsandbytes on its generic CPU path: right on every CPU)

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = rf".*/({'|'.join(LINEAR)})/kernel"
IDS = [[5, 7, 11, 13, 2, 3, 9, 1], [1, 2, 3, 4, 5, 6, 7, 8]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """A tiny Llama: its float32 checkpoint, transformers' 4-bit model of it and that model's checkpoint.

  (Head dim 8: transformers 4.57's Flax Llama mis-sizes rotary embeddings for other head dims.)
  in = 64 rows (blocks within rows) and in = 160 (blocks straddling rows) both occur."""
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=160, num_attention_heads=8,
                                 num_key_value_heads=4, vocab_size=97, max_position_embeddings=16)
  d = tmp_path_factory.mktemp("llama")
  transformers.LlamaForCausalLM(cfg).eval().save_pretrained(str(d / "dense"), safe_serialization=True)
  qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.float32)
  qm = transformers.AutoModelForCausalLM.from_pretrained(str(d / "dense"), quantization_config=qcfg, device_map="cpu",
                                                         dtype=torch.float32).eval()
  qm.save_pretrained(str(d / "bnb-4bit"))
  from safetensors.numpy import load_file

  state = load_file(str(d / "bnb-4bit" / "model.safetensors"))
  flax = transformers.FlaxAutoModelForCausalLM.from_pretrained(str(d / "dense"), from_pt=True)
  return {"dir": d, "torch_q": qm, "state": state, "flax": flax, "params": flax.params}


def test_read_and_write_a_bnb_4bit_checkpoint(llama):
  state, qm, params = llama["state"], llama["torch_q"], llama["params"]
  prefixes = sorted(k[: -len(".quant_state.bitsandbytes__nf4")] for k in state if k.endswith("bitsandbytes__nf4"))
  assert len(prefixes) == 2 * len(LINEAR)
  mine = jlora.quantize(params, targets=TARGETS)
  for prefix in prefixes:
    assert is_bnb_4bit(state, prefix)
    node = from_bnb(state, prefix=prefix)
    module = qm.get_submodule(prefix[: -len(".weight")])
    # Decoding the saved bytes gives bitsandbytes' dequantization of the live module, exactly.
    want = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).numpy().T
    np.testing.assert_array_equal(np.asarray(node.dequantize()), want)
    # Writing it back reproduces every entry byte for byte (the quant-state JSON included).
    back = to_bnb(node, prefix=prefix)
    assert set(back) == {k for k in state if k.startswith(prefix)}
    for k, v in back.items():
      np.testing.assert_array_equal(v, state[k])
    # jlora.quantize of the float32 kernel stores the same packed codes as transformers + bitsandbytes.
    layer, kind, name = prefix.split(".")[2], prefix.split(".")[3], prefix.split(".")[4]
    q = mine["model"]["layers"][layer][kind][name]["kernel"]
    np.testing.assert_array_equal(np.asarray(q.packed).reshape(-1), state[prefix].reshape(-1))
    steps = np.abs(np.asarray(q.absmax).reshape(-1).astype(int) - state[f"{prefix}.absmax"].astype(int))
    assert steps.max() <= 1  # double quantization: within one 8-bit step (see test_bnb_exact)
  # Stacking per-layer matrices gives the scanned layout, decoded layer by layer.
  up = [from_bnb(state, prefix=f"model.layers.{i}.mlp.up_proj.weight") for i in range(2)]
  s = stack(up)
  assert s.shape == (2, 64, 160) and s.format.stack == 1
  np.testing.assert_array_equal(np.asarray(s.dequantize()[1]), np.asarray(up[1].dequantize()))


def test_from_bnb_refusals(llama):
  state = llama["state"]
  p = "model.layers.0.mlp.up_proj.weight"
  part = {k: v for k, v in state.items() if k.startswith(p)}
  with pytest.raises(ValueError, match=r"expected exactly one .*bitsandbytes__<nf4\|fp4> entry, found none"):
    from_bnb(part, prefix="model.layers.0.mlp.down_proj.weight")
  with pytest.raises(ValueError, match=r"missing entries \['model.layers.0.mlp.up_proj.weight.absmax'\]"):
    from_bnb({k: v for k, v in part.items() if not k.endswith(".absmax")}, prefix=p)
  with pytest.raises(ValueError, match=r"quant_map is not bitsandbytes' nf4 code book"):
    from_bnb({**part, f"{p}.quant_map": part[f"{p}.quant_map"][::-1].copy()}, prefix=p)
  with pytest.raises(ValueError, match=r"is a \[64, 64\] matrix, but the checkpoint holds \[160, 64\]"):
    from_bnb(part, prefix=p, shape=(64, 64))
  js = json.loads(bytes(part[f"{p}.quant_state.bitsandbytes__nf4"]).decode())
  js["shape"] = [160, 32]
  bad = {**part, f"{p}.quant_state.bitsandbytes__nf4": np.frombuffer(json.dumps(js).encode(), np.uint8)}
  with pytest.raises(ValueError, match=r"packed holds 5120 values, a \[160, 32\] weight in blocks of 64 needs 2560"):
    from_bnb(bad, prefix=p)


def test_qlora_adapter_loads_in_peft_on_the_bnb_model(llama, tmp_path):
  flax, params = llama["flax"], llama["params"]
  fwd = lambda p, ids: flax(ids, params=p).logits
  qp = jlora.quantize(params, targets=TARGETS)
  cfg = jlora.LoraConfig(rank=4, alpha=8, targets=TARGETS)
  lp = jlora.init(jax.random.key(0), qp, cfg)
  # Train two QLoRA steps so that B is not zero.
  adapters, frozen = jlora.split(lp)
  tx = jlora.optimizer(optax.adam(1e-2), adapters)
  state = tx.init(adapters)
  ids = jnp.asarray(IDS, jnp.int32)

  def loss(a):
    logits = jlora.wrap(fwd)(jlora.combine(a, frozen), ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

  grad = jax.jit(jax.grad(loss))
  for _ in range(2):
    u, state = tx.update(grad(adapters), state, adapters)
    adapters = optax.apply_updates(adapters, u)
  lp = jlora.combine(adapters, frozen)
  out = jlora.peft.save(str(tmp_path / "peft"), lp, base_model_name_or_path=str(llama["dir"] / "dense"),
                        model_type="llama")
  pm = peft.PeftModel.from_pretrained(llama["torch_q"], out).eval()
  assert isinstance(pm.base_model.model.model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
  with torch.no_grad():
    got = pm(torch.tensor(IDS)).logits.numpy()
    with pm.disable_adapter():
      base = pm(torch.tensor(IDS)).logits.numpy()
  want = np.asarray(jax.jit(jlora.wrap(fwd))(lp, ids))
  # float32 on both sides over the same dequantized weights (bit-exact codes; the double
  # quantization offset may be one float32 ulp apart, ~1e-7 relative): PyTorch and XLA only order
  # their sums differently, ~1e-6 on these O(1) logits; 2e-5 as in tests/test_peft.py.
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert np.abs(want - base).max() > 1e-3  # the adapter matters
  np.testing.assert_allclose(base, np.asarray(jax.jit(fwd)(jlora.dequantize(qp), ids)), rtol=2e-5, atol=2e-5)
  assert os.path.exists(os.path.join(out, "adapter_model.safetensors"))
