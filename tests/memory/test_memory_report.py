"""The memory report: categories add up to XLA's own totals, LoRA/DoRA/quantized-base numbers follow
from the shapes, the GPT-3 175B counts of the LoRA paper, and the command line."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import command_env

import jlora
from jlora.memory import _gpt
from jlora.memory import compare, format_table, register_method

CFG = _gpt.PRESETS["gpt-tiny"]


@pytest.fixture(scope="module")
def reports():
  params = _gpt.param_shapes(CFG)
  lay = _gpt.layouts(params)
  config = jlora.LoraConfig(rank=4, alpha=8, targets=jlora.Rule(pattern=r"layers/attn/(query|value)/kernel"))

  def int8(config, *, layout, **ctx):  # a quantized-base method through the hook (QLoRA's shape)
    from test_mechanism import Int8Weight

    def prepare(p):
      p = jax.tree.map(lambda x: x, p)
      for n in ("query", "value"):
        w = p["layers"]["attn"][n]["kernel"]
        p["layers"]["attn"][n]["kernel"] = Int8Weight(w.astype(jnp.int8), jnp.max(w, axis=(1, 2)))
      return p

    return {"config": config, "prepare": prepare}

  register_method("int8-test", int8)
  batch = jax.ShapeDtypeStruct((2, 32), jnp.int32)
  out, skipped = compare(_gpt.loss_fn(CFG), params, batch, config=config, layout=lay,
                         methods=("full", "lora", "int8-test"))
  return {r.method: r for r in out}, params, config, lay


def _bytes(tree):
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_categories_add_up_to_xla_totals(reports):
  rs, params, config, lay = reports
  for r in rs.values():
    # The argument buffers XLA allocates are exactly the frozen + trained weights, optimizer state, batch.
    assert r.frozen_weights + r.trainable_weights + r.optimizer_state + r.inputs == r.xla_argument, r
    assert r.gradients + r.activations == r.xla_temp
    assert r.total == r.xla_total
    assert r.xla_alias >= r.trainable_weights  # the donated trained weights are updated in place


def test_numbers_follow_from_the_shapes(reports):
  rs, params, config, lay = reports
  full, lora, q = rs["full"], rs["lora"], rs["int8-test"]
  weights = _bytes(params)
  assert full.trainable_weights == weights and full.frozen_weights == 0
  assert full.optimizer_state >= 2 * weights  # Adam's two moments (plus a step count)
  lp = jax.eval_shape(lambda p: jlora.init(jax.random.key(0), p, config, layout=lay), params)
  n = jlora.count(lp)
  assert lora.trainable_params == n.trainable and lora.trainable_weights == 4 * n.trainable
  assert lora.frozen_weights == weights and lora.checkpoint == n.adapter_bytes
  dora = jax.eval_shape(lambda p: jlora.init(jax.random.key(0), p, dataclasses.replace(config, dora=True), layout=lay),
                        params)
  assert jlora.count(dora).trainable == n.trainable + 2 * CFG.layers * CFG.d  # + a magnitude per output feature
  kernel = CFG.layers * CFG.d * CFG.d
  assert q.frozen_weights == weights - 2 * kernel * 4 + 2 * kernel + 2 * CFG.layers * 4  # int8 codes + scales
  assert lora.total < full.total and lora.activations < full.activations + full.gradients
  text = format_table(list(rs.values()))
  assert text.splitlines()[0].split() == ["category", "full", "lora", "int8-test"]


def test_gpt3_175b_counts_of_the_lora_paper():
  """LoRA paper §4.2: GPT-3 175B, r=4 on Wq and Wv: 350 GB of fp16 weights, a 35 MB checkpoint."""
  params = _gpt.param_shapes(_gpt.PRESETS["gpt3-175b"])
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == pytest.approx(175e9, rel=0.003)
  config = jlora.LoraConfig(rank=4, alpha=8, adapter_dtype="float16",
                            targets=jlora.Rule(pattern=r"layers/attn/(query|value)/kernel"))
  lp = jax.eval_shape(lambda p: jlora.init(jax.random.key(0), p, config, layout=_gpt.layouts(p)), params)
  n = jlora.count(lp)
  assert n.trainable == 96 * 2 * (12288 * 4 + 4 * 12288)  # 18.9M
  assert n.adapter_bytes == 2 * n.trainable == 37_748_736  # "35 MB" in the paper (36 MiB)
  assert n.frozen_bytes == pytest.approx(350e9, rel=0.003)


def test_command_line(tmp_path):
  cmd = [sys.executable, "-m", "jlora.memory", "--model", "gpt-tiny", "--seq", "8", "--methods", "lora,qlora",
         "--plot", str(tmp_path / "m.png"), "--json", str(tmp_path / "m.json")]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=command_env())
  assert out.returncode == 0, out.stderr
  assert "total (XLA peak estimate)" in out.stdout and (tmp_path / "m.png").stat().st_size > 1000
  data = json.load(open(tmp_path / "m.json"))
  assert [r["method"] for r in data["reports"]][:1] == ["lora"]
  assert all(r["total"] == r["xla_total"] for r in data["reports"])
  bad = subprocess.run([sys.executable, "-m", "jlora.memory", "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=600, env=command_env())
  assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --model") and "Traceback" not in bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1
