"""The QLoRA step's memory, from XLA's own memory analysis of the compiled step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

L, D, FF = 3, 128, 384
STACKED = jlora.KernelLayout(in_axes=(1,), batch_axes=(0,))
NAMES = ("q", "k", "v", "o", "up", "down")


def model(scan: bool):
  keys = iter(jax.random.split(jax.random.key(0), 8))
  shapes = {"q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D), "up": (D, FF), "down": (FF, D)}
  layers = {n: (jax.random.normal(next(keys), (L, *s)) / np.sqrt(s[0])).astype(jnp.bfloat16) for n, s in shapes.items()}
  params = {"layers": layers, "head": (jax.random.normal(next(keys), (D, 64)) / 16).astype(jnp.bfloat16)}

  def f(p, x):
    def body(h, w):
      att = jax.nn.softmax(jnp.einsum("btd,bsd->bts", h @ w["q"], h @ w["k"]) / D**0.5, axis=-1)
      h = h + jnp.einsum("bts,bsd->btd", att, h @ w["v"]) @ w["o"]
      return h + jax.nn.gelu(h @ w["up"]) @ w["down"], None

    if scan:
      h, _ = jax.lax.scan(body, x, p["layers"])
    else:  # unrolled: each layer's kernels indexed out of the stack (decoded one layer at a time too)
      h = x
      for i in range(L):
        h, _ = body(h, {n: w[i] for n, w in p["layers"].items()})
    return h @ p["head"]

  return f, params, {f"layers/{n}": STACKED for n in NAMES}


def step_temp_bytes(f, lp, x):
  adapters, frozen = jlora.split(lp)
  loss = lambda a, fr, x: jnp.mean(jlora.wrap(f)(jlora.combine(a, fr), x).astype(jnp.float32) ** 2)
  compiled = jax.jit(jax.value_and_grad(loss)).lower(adapters, frozen, x).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("scan", [True, False])
def test_qlora_step_temp_memory_is_bf16_lora_plus_at_most_two_layers(scan):
  f, params, layout = model(scan)
  x = jax.random.normal(jax.random.key(1), (2, 64, D), jnp.bfloat16)
  cfg = jlora.LoraConfig(rank=8, targets=r"layers/.*", adapter_dtype="bfloat16")
  bf16 = step_temp_bytes(f, jlora.init(jax.random.key(2), params, cfg, layout=layout), x)
  qp = jlora.quantize(params, targets=r"layers/.*", layout=layout)
  qlora = step_temp_bytes(f, jlora.init(jax.random.key(2), qp, cfg, layout=layout), x)
  one_layer = sum(int(np.prod(params["layers"][n].shape[1:])) * 2 for n in NAMES)  # dequantized bf16 bytes
  assert qlora <= bf16 + 2 * one_layer, (qlora, bf16, one_layer)
  # and it is far from holding every layer's dense kernels at once
  assert qlora < bf16 + L * one_layer / 2
