"""Fine-tuning options end to end on the bundled model: bf16 + remat, packing, chat template."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

import jlora
from jlora.finetune import TrainConfig, run
import jlora.data
from jlora.finetune import model as model_lib
from jlora.finetune.config import DEFAULT_MODEL

# reproducible=False: in-process runs leave this test process's XLA flags alone.
QUICK = dict(steps=8, batch_size=4, max_seq_len=32, eval_exact_match=4, max_new_tokens=4, log_every=2,
             save_every=4, eval_every=4, progress=False, reproducible=False)


def _small_eval(tmp_path):
  from jlora.finetune.config import DEFAULT_EVAL

  with open(DEFAULT_EVAL) as f:
    (tmp_path / "eval.jsonl").write_text("".join(f.readlines()[:8]))
  return str(tmp_path / "eval.jsonl")


@pytest.mark.slow  # --remat also runs in tests/finetune/test_quantize_option.py
def test_bf16_remat_run(tmp_path):
  summary = run(TrainConfig(output_dir=str(tmp_path / "out"), bf16=True, remat=True, lora_dropout=0.1,
                            eval_data=_small_eval(tmp_path), save_merged=True, **QUICK))
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
  meta = jlora.read_adapter_metadata(str(tmp_path / "out" / "adapter"))
  assert {a["dtype"] for a in meta["adapters"].values()} == {"float32"}  # adapters stay float32
  from safetensors import safe_open

  with safe_open(str(tmp_path / "out" / "merged" / "model.safetensors"), framework="numpy") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # written as bfloat16
  merged = model_lib.load(str(tmp_path / "out" / "merged"), bf16=True)
  assert {x.dtype for x in jax.tree.leaves(merged.params)} == {jnp.dtype("bfloat16")}
  assert summary["base_model_bytes"] == sum(x.size * 2 for x in jax.tree.leaves(merged.params))
  with open(tmp_path / "out" / "metrics.jsonl") as f:
    entries = [json.loads(l) for l in f]
  assert [e["step"] for e in entries] == [2, 4, 6, 8] and "eval_loss" in entries[1]
  assert (tmp_path / "out" / "loss_curve.png").stat().st_size > 1000


def test_packed_plain_text_run(tmp_path):
  text = tmp_path / "corpus.txt"
  text.write_text("\n\n".join(f"The value {i} is stored in the list." for i in range(200)))
  # (and an --eval-every that is no multiple of --log-every: each evaluation is logged too)
  options = {**QUICK, "eval_exact_match": -1, "log_every": 3, "eval_every": 2}
  summary = run(TrainConfig(output_dir=str(tmp_path / "out"), data=str(text), pack=True, **options))
  assert "exact_match" not in summary["after"]
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
  with open(tmp_path / "out" / "metrics.jsonl") as f:
    entries = [json.loads(l) for l in f]
  assert [(e["step"], "eval_loss" in e) for e in entries] == [(2, True), (3, False), (4, True), (6, True),
                                                               (8, True)]


def test_chat_template(tmp_path):
  loaded = model_lib.load(DEFAULT_MODEL)
  tok = loaded.tokenizer
  tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
  ids, mask = jlora.data.encode_prompted(tok, jlora.data.Prompted("hi there", " ok"), chat_template=True)
  prompt = tok.decode(ids[: mask.index(1)])
  assert prompt == "<user>hi there\n<assistant>"
  assert tok.decode(ids[mask.index(1):], skip_special_tokens=True) == " ok"
  assert mask[-1] == 1 and ids[-1] == tok.eos_token_id


@pytest.mark.slow  # the command is covered by tests/multi/test_serve.py and tests/finetune/test_cli.py
def test_generate_cli(tmp_path, capsys):
  from jlora.generate import main

  out = tmp_path / "out"
  run(TrainConfig(output_dir=str(out), eval_data=_small_eval(tmp_path), **QUICK))
  capsys.readouterr()  # drop the training output
  assert main(["--adapter", str(out / "adapter"), "--adapter", str(out / "peft"),
               "--prompt", "Reverse the words: a b c\nAnswer:", "--max-new-tokens", "3"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert [l.split("]")[0] + "]" for l in lines] == [
      "[base]", f"[{out / 'adapter'} (unmerged)]", f"[{out / 'adapter'} (merged)]",
      f"[{out / 'peft'} (unmerged)]", f"[{out / 'peft'} (merged)]"]
  outputs = [l.split("-> ", 1)[1] for l in lines]
  assert outputs[1] == outputs[2] == outputs[3] == outputs[4]  # jlora and PEFT copies agree


def test_a_conversation_set_trains_through_the_chat_template_and_shows_its_masks(tmp_path, capsys):
  """The bundled two-round chats (OpenAI messages): both assistant turns trained, exact match on the
  last answer from the conversation before it; --show-example prints the trained tokens marked."""
  from jlora.finetune.options import ASSETS

  chats = f"{ASSETS}/data/word_chats.train.jsonl"
  held = tmp_path / "held.jsonl"
  with open(f"{ASSETS}/data/word_chats.eval.jsonl") as f:
    held.write_text("".join(f.readlines()[:8]))
  summary = run(TrainConfig(output_dir=str(tmp_path / "out"), data=chats, eval_data=str(held), steps=4,
                            batch_size=8, max_seq_len=128, rank=2, eval_exact_match=4, max_new_tokens=8,
                            progress=False))
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
  rows = [json.loads(line) for line in (tmp_path / "out" / "eval_examples.jsonl").read_text().splitlines()]
  assert len(rows) == 4 and rows[0]["prompt"].endswith("Now sort them.<|endoftext|>\n<|assistant|>\n")
  assert "truncated" not in capsys.readouterr().out  # 128 tokens hold every conversation
  run(TrainConfig(data=chats, show_example=0, max_seq_len=128))
  shown = capsys.readouterr().out
  header, body = shown.split("\n", 1)
  assert header.startswith("example 0 of 1000: ") and body.count("[[") == 2  # the two answers, nothing else
  assert "[[case part object<|endoftext|>\n]]" in shown and "<|user|>\nNow sort them.<|endoftext|>" in shown
