"""TRL 1.16's tokenization and masks equal jlora.data's on the same records.

Real TRL trainers (a one-layer LlamaForCausalLM on the bundled tokenizer's vocabulary) prepare
the datasets; their collators truncate and pad. jlora's arrays are compared row by row with
the padding cut off (TRL pads to the longest row of a batch, jlora to max_len).
"""

import copy
import tempfile

import numpy as np
import pytest

from jlora.data import (Example, Row, parse_preference, parse_sft, parse_unpaired, tokenize_preference,
                        tokenize_sft, tokenize_unpaired)
from data_templates import TEMPLATES

trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def trainer():
  """``trainer(kind, tokenizer, rows, **config)``: a TRL trainer of ``kind`` (sft, dpo, kto) on ``rows``."""
  import datasets
  import transformers
  from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer
  datasets.disable_progress_bars()
  transformers.logging.set_verbosity_error()
  kinds = {"sft": (SFTTrainer, SFTConfig), "dpo": (DPOTrainer, DPOConfig), "kto": (KTOTrainer, KTOConfig)}

  def make(kind, tok, rows, **config):
    cls, config_cls = kinds[kind]
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512))
    args = config_cls(output_dir=tempfile.mkdtemp(), report_to=[], bf16=False, **config)
    ref = {} if kind == "sft" else {"ref_model": copy.deepcopy(model)}  # the model has no hub id to reload
    return cls(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok, **ref)

  return make


def trimmed(ids, mask, length):
  return [int(i) for i in ids[:length]], [int(m) for m in mask[:length]]


STANDARD_SFT = [{"prompt": "2+2=", "completion": " 4"}, {"prompt": "Reverse: a b\nAnswer:", "completion": " b a"},
                {"prompt": "Name a colour.", "completion": " Blue, like the sky."}]


def test_sft_prompt_completion(trainer, plain_tokenizer):
  """SFTTrainer with completion_only_loss (the default for prompt-completion data)."""
  tok = plain_tokenizer
  trl_data = trainer("sft", tok, STANDARD_SFT, max_length=64).train_dataset
  ours, _ = tokenize_sft([Example(f"d.jsonl:{i}", parse_sft(Row("", r))) for i, r in enumerate(STANDARD_SFT)],
                         tok, max_len=64)
  for i, row in enumerate(trl_data):
    n = len(row["input_ids"])
    assert trimmed(ours.ids[i], ours.loss_mask[i], n) == (row["input_ids"], [int(x != -100) for x in row["labels"]])
    assert ours.attention_mask[i].sum() == n


def test_sft_prompt_completion_where_bpe_merges_across_the_boundary(trainer, plain_tokenizer):
  """The one difference on prompt/completion data: TRL tokenizes prompt + completion as one text.

  With a prompt ending in a space, TRL's prompt loses its last token (the space merges with the
  completion's first word, and TRL warns); jlora tokenizes prompt and completion apart, so the
  model trains on the prompt as it will be given, and the completion's tokens are what it
  generates after it.
  """
  tok = plain_tokenizer
  row = {"prompt": "The sky is ", "completion": "the sea"}
  (trl_row,) = trainer("sft", tok, [row], max_length=64).train_dataset
  ours, _ = tokenize_sft([Example("d.jsonl:1", parse_sft(Row("", row)))], tok, max_len=64)
  prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
  assert trl_row["input_ids"][:len(prompt)] != prompt
  assert ours.ids[0, :len(prompt)].tolist() == prompt


def chat_rows():
  return [
      {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                    {"role": "assistant", "content": "Goodbye, see you."}]},
      {"messages": [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "Sunny."},
                    {"role": "user", "content": "And in Rome?"}, {"role": "assistant", "content": "Rainy."}]},
      {"messages": [{"role": "user", "content": "word " * 30}, {"role": "assistant", "content": "Too long."}]},
  ]


@pytest.mark.parametrize("cut", [False, True])
def test_sft_conversations_with_assistant_only_loss(trainer, make_tokenizer, cut):
  """SFTTrainer with assistant_only_loss on a {% generation %}-tagged Llama 3.1 template (used as is by TRL).

  With ``cut``, max_len ends inside the first conversation's last answer (both keep the start) and
  the third's prompt leaves no room for its answer (TRL drops it; jlora skips it with skip_bad).
  """
  tok = make_tokenizer(TEMPLATES["llama31"][1])
  rows = chat_rows()
  examples = [Example(f"d.jsonl:{i}", parse_sft(Row("", r))) for i, r in enumerate(rows)]
  full, _ = tokenize_sft(examples, tok, max_len=1024)
  max_len = int(np.flatnonzero(full.loss_mask[0])[-1]) - 2 if cut else 1024
  assert not cut or int(np.flatnonzero(full.loss_mask[2])[0]) >= max_len
  trl_data = trainer("sft", tok, rows, max_length=max_len, assistant_only_loss=True).train_dataset
  ours, report = tokenize_sft(examples, tok, max_len=max_len, skip_bad=True)
  assert len(ours) == len(trl_data) == (2 if cut else 3) and len(report.skipped) == cut
  assert report.truncated == cut
  for i, row in enumerate(trl_data):
    n = len(row["input_ids"])
    assert trimmed(ours.ids[i], ours.loss_mask[i], n) == (row["input_ids"], [int(x != -100) for x in row["labels"]])


def test_sft_conversational_prompt_completion(trainer, make_tokenizer):
  """Conversational prompt/completion: TRL's completion mask equals jlora's mask of the completion's turns."""
  tok = make_tokenizer("gemma3")
  rows = [{"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Bye"}],
           "completion": [{"role": "assistant", "content": "Goodbye."}]}]
  (trl_row,) = trainer("sft", tok, rows, max_length=96).train_dataset
  ours, _ = tokenize_sft([Example("d.jsonl:1", parse_sft(Row("", rows[0])))], tok, max_len=96)
  n = len(trl_row["input_ids"])
  assert trimmed(ours.ids[0], ours.loss_mask[0], n) == (trl_row["input_ids"],
                                                        [int(x != -100) for x in trl_row["labels"]])


def test_sft_conversational_prompt_completion_where_the_header_tokenizes_apart(trainer, make_tokenizer):
  """Where the generation prompt alone tokenizes differently from inside the conversation, TRL trains the difference.

  Llama 3.1's header ends with "\\n\\n": the bundled tokenizer's GPT-2 pre-tokenizer makes one
  token of it at the end of the text and two before the answer. TRL's completion starts where
  the token sequences diverge, so it trains the two newline tokens of the header; jlora's span
  starts at the answer (the boundary is a token boundary of the conversation's tokens).
  """
  tok = make_tokenizer("llama31")
  row = {"prompt": [{"role": "user", "content": "Bye"}], "completion": [{"role": "assistant", "content": "Goodbye."}]}
  (trl_row,) = trainer("sft", tok, [row], max_length=96).train_dataset
  ours, _ = tokenize_sft([Example("d.jsonl:1", parse_sft(Row("", row)))], tok, max_len=96)
  n = len(trl_row["input_ids"])
  assert ours.ids[0, :n].tolist() == trl_row["input_ids"]
  trl_trained = [t for t, label in zip(trl_row["input_ids"], trl_row["labels"]) if label != -100]
  ours_trained = ours.ids[0][ours.loss_mask[0] == 1].tolist()
  assert tok.decode(trl_trained) == "\n\nGoodbye.<|eot_id|>" and tok.decode(ours_trained) == "Goodbye.<|eot_id|>"


def u(content):
  return {"role": "user", "content": content}


def a(content):
  return {"role": "assistant", "content": content}


PREFERENCE = {  # (rows, the number TRL drops: a prompt filling max_len)
    "standard": ([{"prompt": "2+2=", "chosen": " 4", "rejected": " 5"},
                  {"prompt": "The sky is ", "chosen": "blue.", "rejected": "green, always and forever."},  # BPE
                  {"prompt": "word " * 60, "chosen": " yes", "rejected": " no"}], 1),
    "standard implicit": ([{"chosen": "The sea is blue.", "rejected": "The sea is red."},
                           {"chosen": "2+2=4", "rejected": "2+2=5, or so I think, maybe more, who knows."}], 0),
    "conversational": ([{"prompt": [u("2+2?")], "chosen": [a("4")], "rejected": [a("5, or so I think, maybe.")]},
                        {"prompt": [u("word " * 60)], "chosen": [a("yes")], "rejected": [a("no")]}], 1),
    "conversational implicit": ([{"chosen": [u("Hi"), a("Hello!"), u("Bye"), a("Goodbye.")],
                                  "rejected": [u("Hi"), a("Hello!"), u("Bye"), a("No, stay here a while.")]}], 0),
}


@pytest.mark.parametrize("case,template", [("standard", None), ("standard implicit", None),
                                           ("conversational", "llama31"), ("conversational", "qwen3"),
                                           ("conversational implicit", "llama31")])
def test_dpo(trainer, make_tokenizer, plain_tokenizer, case, template):
  """DPOTrainer._prepare_dataset and DataCollatorForPreference (keep_start truncation) equal tokenize_preference.

  (TRL reads one dataset: the implicit-prompt rows cannot share it with rows that have a prompt.)
  """
  tok = make_tokenizer(template) if template else plain_tokenizer
  rows, dropped = PREFERENCE[case]
  examples = [Example(f"d.jsonl:{i}", parse_preference(Row("", r))) for i, r in enumerate(rows)]
  # max_len: room for every prompt but the long one, and a few answer tokens (the longer answers are cut).
  full, _ = tokenize_preference(examples, tok, max_len=4096)
  prompts = full.chosen_completion_mask.argmax(1)
  max_len = int(prompts[:len(rows) - dropped].max()) + 3
  assert (prompts[len(rows) - dropped:] >= max_len).all()
  t = trainer("dpo", tok, rows, max_length=max_len)
  batch = t.data_collator(list(t.train_dataset))
  ours, report = tokenize_preference(examples, tok, max_len=max_len, skip_bad=True)
  n = len(t.train_dataset)
  assert len(ours) == n == len(rows) - dropped and len(report.skipped) == dropped
  assert report.truncated >= 1
  if case.startswith("standard"):
    assert report.prompt_merged == (case == "standard")
  for i in range(n):
    for half, name in ((0, "chosen"), (1, "rejected")):
      row = half * n + i
      length = int(batch["attention_mask"][row].sum())
      ids, mask = getattr(ours, f"{name}_ids")[i], getattr(ours, f"{name}_completion_mask")[i]
      assert trimmed(ids, mask, length) == (batch["input_ids"][row, :length].tolist(),
                                            batch["completion_mask"][row, :length].tolist())
      assert getattr(ours, f"{name}_attention_mask")[i].sum() == length
  stacked = ours.pairs(np.arange(n))
  assert stacked["ids"].shape == (2 * n, max_len)


@pytest.mark.parametrize("conversational", [False, True])
def test_kto_and_its_kl_pairs(trainer, make_tokenizer, plain_tokenizer, conversational):
  """KTOTrainer._prepare_dataset (with its KL completions) and its collator equal tokenize_unpaired."""
  tok = make_tokenizer("llama31") if conversational else plain_tokenizer
  rows = [{"prompt": p, "completion": c, "label": label} for p, c, label in [
      ("2+2=", " 4", True), ("2+2=", " 5, or so I think, maybe more.", False), ("The sky is ", "blue.", True),
      ("word " * 60, " yes", True), ("3+3=", " 6", True), ("Name a colour.", " Red.", False)]]
  if conversational:
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["completion"]}], "label": r["label"]} for r in rows]
  examples = [Example(f"d.jsonl:{i}", parse_unpaired(Row("", r))) for i, r in enumerate(rows)]
  full, _ = tokenize_unpaired(examples, tok, max_len=4096)
  prompts = full.prompt_lens
  max_len, batch_size = int(np.delete(prompts, 3).max()) + 3, 2
  assert prompts[3] >= max_len
  t = trainer("kto", tok, rows, max_length=max_len, per_device_train_batch_size=batch_size)
  trl_rows = list(t.train_dataset)
  ours, report = tokenize_unpaired(examples, tok, max_len=max_len, skip_bad=True)
  assert len(ours) == len(trl_rows) == 5 and len(report.skipped) == 1
  for start in range(0, len(trl_rows), batch_size):
    block = np.arange(start, min(start + batch_size, len(trl_rows)))
    batch = t.data_collator([trl_rows[i] for i in block])
    kl = ours.mismatched(block)
    for j, i in enumerate(block):
      length = int(batch["attention_mask"][j].sum())
      assert trimmed(ours.ids[i], ours.completion_mask[i], length) == (
          batch["input_ids"][j, :length].tolist(), batch["completion_mask"][j, :length].tolist())
      assert bool(ours.label[i]) == bool(batch["label"][j])
      length = int(batch["KL_attention_mask"][j].sum())
      assert kl["attention_mask"][j].sum() == length
      assert trimmed(kl["ids"][j], kl["completion_mask"][j], length) == (
          batch["KL_input_ids"][j, :length].tolist(), batch["KL_completion_mask"][j, :length].tolist())
