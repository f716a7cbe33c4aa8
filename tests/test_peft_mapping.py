"""The built-in Flax-path -> torch-module map, and export of multi-axis and stacked kernels."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import jlora
import jlora.peft
from helpers import randomize

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


def tiny(cls_name, **kw):
  cfg_cls = {"gpt2": transformers.GPT2Config, "llama": transformers.LlamaConfig,
             "mistral": transformers.MistralConfig, "gemma": transformers.GemmaConfig}[cls_name]
  if cls_name == "gpt2":
    return cfg_cls(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=16)
  return cfg_cls(num_hidden_layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=64, max_position_embeddings=16, head_dim=8, **kw)


@pytest.mark.parametrize("arch,flax_cls,torch_cls", [
    ("gpt2", "FlaxGPT2LMHeadModel", "GPT2LMHeadModel"),
    ("llama", "FlaxLlamaForCausalLM", "LlamaForCausalLM"),
    ("mistral", "FlaxMistralForCausalLM", "MistralForCausalLM"),
    ("gemma", "FlaxGemmaForCausalLM", "GemmaForCausalLM"),
])
def test_builtin_map_names_real_torch_modules(arch, flax_cls, torch_cls):
  cfg = tiny(arch)
  params = getattr(transformers, flax_cls)(cfg, seed=0).params
  torch_modules = dict(getattr(transformers, torch_cls)(cfg).named_modules())
  mm = jlora.peft.ModuleMap.for_model_type(arch)
  kernels = [p for p, x in jlora._tree.leaves_with_paths(params) if p.endswith(("/kernel", "/embedding"))]
  assert kernels
  for path in kernels:
    name = mm.to_module(path, ())
    assert name in torch_modules, (path, name)
    leaf = dict(jlora._tree.leaves_with_paths(params))[path]
    mod = torch_modules[name]
    # The Flax kernel, laid out by the map, has the torch module's (out, in) / (num, dim) shape.
    lay = mm.layout_for(path, 2, path.endswith("/embedding"))
    out_axes = lay.out_axes(2)
    if lay.embedding:
      assert tuple(mod.weight.shape) == leaf.shape
    elif isinstance(mod, torch.nn.Linear):
      assert (mod.out_features, mod.in_features) == (leaf.shape[out_axes[0]], leaf.shape[lay.in_axes[0]])
    else:  # GPT-2 Conv1D stores (in, out)
      assert tuple(mod.weight.shape) == (leaf.shape[lay.in_axes[0]], leaf.shape[out_axes[0]])


def test_multi_axis_kernel_exports_as_the_equivalent_linear(tmp_path):
  # A (d, heads, head_dim) projection corresponds to a torch Linear(d, heads*head_dim).
  m = nn.DenseGeneral(features=(4, 5), axis=-1, use_bias=False, name="q_proj")
  x = jax.random.normal(jax.random.key(0), (3, 8))
  params = {"q_proj": m.init(jax.random.key(1), x)["params"]}
  f = lambda p, x: m.apply({"params": p["q_proj"]}, x)
  lp = randomize(jlora.init(jax.random.key(2), params, jlora.LoraConfig(rank=3, alpha=6, targets=r"q_proj/kernel"),
                            layout=jlora.infer_layout(f, params, x)), jax.random.key(3))
  d = jlora.peft.save(str(tmp_path / "p"), lp)
  t = load_file(os.path.join(d, "adapter_model.safetensors"))
  a, b = t["base_model.model.q_proj.lora_A.weight"], t["base_model.model.q_proj.lora_B.weight"]
  assert a.shape == (3, 8) and b.shape == (20, 3)
  w = np.asarray(params["q_proj"]["kernel"]).reshape(8, 20).T  # torch Linear weight (out, in)
  torch_y = np.asarray(x) @ (w + 2.0 * b @ a).T
  np.testing.assert_allclose(torch_y, np.asarray(jlora.wrap(f)(lp, x)).reshape(3, 20), rtol=1e-5, atol=1e-5)
  back = jlora.peft.load(d, params, layout=jlora.infer_layout(f, params, x))
  np.testing.assert_array_equal(np.asarray(back["q_proj"]["kernel"].b), np.asarray(lp["q_proj"]["kernel"].b))


def test_stacked_kernel_is_unstacked_into_per_layer_modules(tmp_path):
  params = {"layers": {"mlp": {"kernel": jax.random.normal(jax.random.key(0), (3, 8, 6))}}}
  lay = jlora.KernelLayout(in_axes=(1,), batch_axes=(0,))
  lp = randomize(jlora.init(jax.random.key(1), params, jlora.LoraConfig(
      rank=2, targets=[jlora.Rule(pattern=r"layers/mlp/kernel", layout=lay)])), jax.random.key(2))
  mm = jlora.peft.ModuleMap(to_module=lambda path, idx: f"model.layers.{idx[0]}.mlp.up_proj")
  d = jlora.peft.save(str(tmp_path / "p"), lp, module_map=mm)
  t = load_file(os.path.join(d, "adapter_model.safetensors"))
  w = lp["layers"]["mlp"]["kernel"]
  for i in range(3):
    np.testing.assert_array_equal(t[f"base_model.model.model.layers.{i}.mlp.up_proj.lora_A.weight"], np.asarray(w.a[i]).T)
    np.testing.assert_array_equal(t[f"base_model.model.model.layers.{i}.mlp.up_proj.lora_B.weight"], np.asarray(w.b[i]).T)
  with open(os.path.join(d, "adapter_config.json")) as f:
    assert json.load(f)["target_modules"] == [f"model.layers.{i}.mlp.up_proj" for i in range(3)]
  with pytest.raises(ValueError, match="stacked .* ModuleMap"):
    jlora.peft.save(str(tmp_path / "q"), lp)


def test_the_same_adapter_gives_the_same_file_in_every_process(tmp_path):
  """safetensors writes ``__metadata__`` in a hash map's per-process order; jlora's export sorts it."""
  import subprocess
  import sys

  code = ("import sys, jax, jax.numpy as jnp, jlora, jlora.peft; "
          "p = {'model': {'layers': {'0': {'q_proj': {'kernel': jnp.ones((8, 8))}}}}}; "
          "lp = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=2, alpha=4, targets='.*q_proj/kernel')); "
          "jlora.peft.save(sys.argv[1], lp, base_model_name_or_path='my/base')")
  files = []
  for i in range(4):  # the order was random per process: 4 processes all agreeing is 1 chance in 8 by luck
    out = tmp_path / str(i)
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env={**__import__("os").environ,
                                                                            "JAX_PLATFORMS": "cpu"})
    files.append((out / "adapter_model.safetensors").read_bytes())
  assert all(f == files[0] for f in files)
  import json
  import struct

  (length,) = struct.unpack("<Q", files[0][:8])
  meta = json.loads(files[0][8:8 + length])["__metadata__"]  # (safe_open's dict has its own random order)
  assert list(meta) == sorted(meta) and meta["format"] == "pt" and len(meta) == 2  # format + base fingerprint
