"""``python -m jlora.memory`` run as a user runs it (subprocesses), on the bundled Hugging Face model
directory (the native decoder, from its config.json alone) and on the LoRA paper's GPT-3 175B preset,
checked against the counts that follow from the shapes."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import jax
import pytest
from helpers import command_env

import jlora
import jlora.models
from jlora.memory import CATEGORIES, format_bytes

TINY_BASE = os.path.join(os.path.dirname(jlora.__file__), "assets", "tiny-base")
ROWS = ["frozen weights", "trainable weights", "gradients", "optimizer state", "activations + temporaries",
        "batch", "other outputs", "total (XLA peak estimate)", "checkpoint", "trainable params"]
METHODS = ["full", "lora", "dora", "qlora"]
_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


def memory(*args: str) -> tuple[str, dict[str, dict[str, str]]]:
  """Runs ``python -m jlora.memory ARGS``; returns the title and ``{row: {method: cell}}`` of its table."""
  res = subprocess.run([sys.executable, "-m", "jlora.memory", *args], capture_output=True, text=True,
                       timeout=900, env=command_env())
  assert res.returncode == 0, res.stderr[-4000:]
  assert "Traceback" not in res.stderr
  title, header, *lines = res.stdout.splitlines()
  assert header.split() == ["category", *METHODS], header
  width = (len(header) - 26) // len(METHODS)
  table = {}
  for line in lines:
    cells = [line[26 + i * width: 26 + (i + 1) * width].strip() for i in range(len(METHODS))]
    table[line[:26].strip()] = dict(zip(METHODS, cells))
  return title, table


def as_bytes(cell: str) -> float:
  value, unit = cell.split()
  return float(value) * _UNITS[unit]


def test_the_categories_are_the_reports():
  assert len(ROWS) == len(CATEGORIES) + 3  # + total, checkpoint and trainable params


def test_bundled_model_directory_from_its_config_alone():
  title, table = memory("--model", TINY_BASE)
  assert title == "tiny-base: batch 1x512, adam, LoRA r=4 (float32) on all-linear"
  assert list(table) == ROWS
  # What the table must say, from the shapes: float32 weights; r=4 on the 7 projections of each layer.
  model = jlora.models.Decoder(jlora.models.read_config(TINY_BASE))
  params = model.shapes()
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  linear = [x.shape for p, x in _flat(params) if re.fullmatch(r"layers/(self_attn|mlp)/\w+_proj/kernel", p)]
  assert len(linear) == 7  # (layers, in, out) each
  lora = sum(layers * 4 * (d_in + d_out) for layers, d_in, d_out in linear)  # A (in, 4) and B (4, out) per layer
  dora = lora + sum(layers * d_out for layers, _, d_out in linear)  # + one magnitude per output feature
  assert table["trainable params"] == {"full": f"{total:,}", "lora": f"{lora:,}", "dora": f"{dora:,}",
                                       "qlora": f"{lora:,}"}
  assert table["frozen weights"]["full"] == "0 B"
  assert table["trainable weights"]["full"] == table["frozen weights"]["lora"] == format_bytes(4 * total)
  for method, n in (("lora", lora), ("dora", dora), ("qlora", lora)):
    assert table["trainable weights"][method] == table["gradients"][method] == format_bytes(4 * n)
    assert table["checkpoint"][method] == format_bytes(4 * n)
    assert table["optimizer state"][method] == format_bytes(8 * n)  # Adam's two moments
  assert table["batch"]["lora"] == format_bytes(512 * 4)  # int32 ids
  # The 4-bit base: every linear kernel in NF4 (~0.5 byte per weight), embeddings and norms as they were.
  assert as_bytes(table["frozen weights"]["qlora"]) < 0.4 * as_bytes(table["frozen weights"]["lora"])
  for method in METHODS:
    parts = sum(as_bytes(table[row][method]) for row in ROWS[:7])
    assert as_bytes(table["total (XLA peak estimate)"][method]) == pytest.approx(parts, rel=0.01)


def test_gpt3_175b_preset_of_the_lora_paper():
  title, table = memory("--model", "gpt3-175b")
  assert title == "gpt3-175b: batch 1x2048, adam, LoRA r=4 (float32) on .*/(query|value)/kernel"
  assert list(table) == ROWS
  lora = 96 * 2 * (12288 * 4 + 4 * 12288)  # r=4 on W_q and W_v of 96 layers
  assert table["trainable params"] == {"full": "174,604,259,328", "lora": f"{lora:,}",
                                       "dora": f"{lora + 96 * 2 * 12288:,}", "qlora": f"{lora:,}"}
  assert table["frozen weights"]["lora"] == table["trainable weights"]["full"] == "349 GB"  # fp16 weights
  assert table["checkpoint"]["lora"] == format_bytes(4 * lora)  # float32 adapters
  # The paper (§4.2): training VRAM 1.2 TB with full fine-tuning, 350 GB with LoRA.
  full, low = (as_bytes(table["total (XLA peak estimate)"][m]) for m in ("full", "lora"))
  assert full > 1.2e12 and low < 0.3 * full
  assert as_bytes(table["frozen weights"]["qlora"]) < 0.3 * as_bytes(table["frozen weights"]["lora"])


def _flat(params):
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    yield "/".join(str(k.key) for k in path), leaf
