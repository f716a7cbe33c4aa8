"""Generation with a different adapter per row of one batch (KV cache), and ``jlora-generate`` batching.

References: each adapter generating alone (its plain LoRA tree, low-rank path), the dense merged
model ``W0 + s·A·B`` (``jlora.merge``), the base alone for rows with id -1, and PEFT's own
mixed-batch generation (``adapter_names=``) on the PyTorch Llama with the same adapters. Greedy
decoding, compared token for token: every reference must pick exactly the same ids.
"""

from __future__ import annotations

import ast
import dataclasses
import re

import jax
import numpy as np
import pytest
from finetune.cli_runs import generate

import jlora
import jlora.models
import jlora.multi
from helpers import randomize
from jlora.finetune import model as model_lib
from jlora.finetune.config import DEFAULT_MODEL
from jlora.generate import generate_text

PROMPTS = ["Reverse the words: rule list node\nAnswer:", "Reverse the words: a b", "Sort:"]
NEW = 8


@dataclasses.dataclass
class Served:
  loaded: model_lib.LoadedModel
  adapters: list  # three LoRA trees on loaded.params with random non-zero A and B
  prompts: list[list[int]]  # PROMPTS as token ids (different lengths)


@pytest.fixture(scope="module")
def served() -> Served:
  loaded = model_lib.load(DEFAULT_MODEL)
  target = loaded.resolve_targets
  configs = [
      # rank 2 on every linear layer, the MLP with its own rank and alpha (a per-rule scale)
      jlora.LoraConfig(rank=2, alpha=4, targets=[jlora.Rule(pattern=target("gate_proj,up_proj,down_proj"), rank=3,
                                                             alpha=1.5), target("all-linear")]),
      jlora.LoraConfig(rank=8, alpha=6, rslora=True, targets=target("all-linear")),  # rank 8, rsLoRA
      jlora.LoraConfig(rank=4, alpha=8, targets=target("q_proj,v_proj")),  # rank 4, fewer targets
  ]

  @jax.jit
  def make(params):  # one compiled program for all adapters (eagerly, every shape compiles its own RNG)
    return [randomize(jlora.init(jax.random.key(i), params, c, layout=loaded.layout), jax.random.key(10 + i),
                      scale=0.15) for i, c in enumerate(configs)]

  ids = [loaded.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
  return Served(loaded, make(loaded.params), ids)


def test_mixed_batch_equals_each_adapter_alone_merged_and_base(served):
  model, base = served.loaded.model, served.loaded.params
  # 8 rows: every prompt with every adapter and the base (-1), in a shuffled order
  slots = [0, 2, -1, 1, 1, -1, 2, 0]
  prompts = [served.prompts[r % len(served.prompts)] for r in range(len(slots))]
  gen = lambda params, **kw: jlora.models.generate(model, params, prompts, max_new_tokens=NEW, eos_id=(), **kw)
  mixed = gen(jlora.stack(served.adapters), adapter_ids=slots)
  alone = {-1: gen(base)}
  merged = {}
  for k, lp in enumerate(served.adapters):
    alone[k] = gen(lp)  # the same prompts, every row with adapter k (plain tree: no bank)
    merged[k] = gen(jlora.merge(lp))
  for r, k in enumerate(slots):
    assert mixed[r] == alone[k][r], (r, k)
    if k >= 0:
      assert mixed[r] == merged[k][r], (r, k)
  # the comparison has teeth: on each prompt the three adapters and the base generate four different outputs
  for r in range(len(served.prompts)):
    assert len({tuple(alone[k][r]) for k in (-1, 0, 1, 2)}) == 4, r


def test_mixed_batch_matches_peft_mixed_batch_generation(served, tmp_path):
  """PEFT's ``generate(adapter_names=...)`` on PyTorch, the adapters exported with ``jlora.peft.save``."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  import transformers

  tm = transformers.LlamaForCausalLM.from_pretrained(DEFAULT_MODEL, torch_dtype=torch.float32).eval()
  pm = None
  for k, lp in enumerate(served.adapters):
    d = jlora.peft.save(str(tmp_path / f"a{k}"), lp, module_map=served.loaded.module_map)
    if pm is None:
      pm = peft.PeftModel.from_pretrained(tm, d, adapter_name="a0")
    else:
      pm.load_adapter(d, adapter_name=f"a{k}")
  slots = [1, -1, 0, 2, 0, 1]
  prompts = [served.prompts[r % len(served.prompts)] for r in range(len(slots))]
  width = max(map(len, prompts))
  ids = np.zeros((len(prompts), width), np.int64)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
  with torch.no_grad():
    out = pm.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=NEW,
                      do_sample=False, eos_token_id=None, pad_token_id=0,
                      adapter_names=[f"a{k}" if k >= 0 else "__base__" for k in slots])
  want = out[:, width:].numpy().tolist()
  bank = jlora.multi.load_bank([str(tmp_path / f"a{k}") for k in range(3)], served.loaded.params,
                               module_map=served.loaded.module_map,
                               layout=served.loaded.layout)
  got = jlora.models.generate(served.loaded.model, bank, prompts, max_new_tokens=NEW, eos_id=(), adapter_ids=slots)
  assert got == want


def test_generate_refuses_bad_adapter_ids(served):
  model, base = served.loaded.model, served.loaded.params
  bank = jlora.stack(served.adapters[:2])
  with pytest.raises(ValueError, match=r"adapter_ids must be one integer per prompt, shape \(3,\)"):
    jlora.models.generate(model, bank, served.prompts, max_new_tokens=2, adapter_ids=[0, 1])
  with pytest.raises(ValueError, match=r"adapter_ids must be one integer per prompt.*float"):
    jlora.models.generate(model, bank, served.prompts, max_new_tokens=2, adapter_ids=[0.0, 1.0, 0.0])
  with pytest.raises(ValueError, match="params hold no adapters; pass a bank built with jlora.stack"):
    jlora.models.generate(model, base, served.prompts, max_new_tokens=2, adapter_ids=[0, 1, 0])
  with pytest.raises(ValueError, match="adapter_ids: one adapter slot per prompt is needed, got 2 for 3 prompts"):
    served.loaded.generate(bank, served.prompts, max_new_tokens=2, adapter_ids=[0, 1])


LINE = re.compile(r"^\[(.*)\] (.*) -> (.*)$")


def test_cli_batches_adapters_and_matches_each_alone(served, tmp_path):
  """``jlora-generate`` with a jlora and a PEFT adapter: base, unmerged and merged outputs, one batch."""
  a = jlora.save_adapter(str(tmp_path / "a"), served.adapters[0])
  b = jlora.peft.save(str(tmp_path / "b"), served.adapters[1], module_map=served.loaded.module_map)
  prompts = PROMPTS[:2]
  prompt_args = [x for p in prompts for x in ("--prompt", p)]
  res = generate("--model", DEFAULT_MODEL, "--adapter", a, "--adapter", b, *prompt_args, "--max-new-tokens", str(NEW))
  assert res.returncode == 0, res.stderr[-3000:]
  lines = [LINE.match(l).groups() for l in res.stdout.splitlines()]
  labels = ["base", f"{a} (unmerged)", f"{a} (merged)", f"{b} (unmerged)", f"{b} (merged)"]
  assert [l for l, _, _ in lines] == [l for l in labels for _ in prompts]
  assert [ast.literal_eval(p) for _, p, _ in lines] == prompts * len(labels)  # the command prints repr()
  printed = {}
  for label, _, text in lines:
    printed.setdefault(label, []).append(ast.literal_eval(text))
  gen = lambda params: generate_text(served.loaded, params, prompts, max_new_tokens=NEW)
  assert printed["base"] == gen(served.loaded.params)
  for d in (a, b):
    lp = jlora.multi.load(d, served.loaded.params, module_map=served.loaded.module_map,
                          layout=served.loaded.layout)
    assert printed[f"{d} (unmerged)"] == gen(lp)  # batched in the command, alone here
    assert printed[f"{d} (merged)"] == printed[f"{d} (unmerged)"]
  assert printed[f"{a} (unmerged)"] != printed[f"{b} (unmerged)"] != printed["base"]
  # --no-merged prints the batch only
  res = generate("--model", DEFAULT_MODEL, "--adapter", a, "--adapter", b, "--prompt", prompts[0],
                 "--max-new-tokens", "2", "--no-merged")
  assert res.returncode == 0, res.stderr[-3000:]
  assert [LINE.match(l).group(1) for l in res.stdout.splitlines()] == ["base", f"{a} (unmerged)",
                                                                        f"{b} (unmerged)"]
