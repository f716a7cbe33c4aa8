"""Preference and unpaired tokenization (jlora.data._preference): errors, skipping, batches, KL pairs."""

import numpy as np
import pytest

from jlora.data import (DataError, Example, Message, Preference, Prompted, Unpaired, tokenize_preference,
                        tokenize_unpaired)


def ex(record, where="d.jsonl:1"):
  return Example(where, record)


def test_pairs_stack_chosen_then_rejected(plain_tokenizer):
  pairs = [ex(Preference("2+2=", " 4", " 5")), ex(Preference("3+3=", " 6", " 7<|endoftext|>"), "d.jsonl:2")]
  data, report = tokenize_preference(pairs, plain_tokenizer, max_len=8)
  assert report.lines() == []
  batch = data.pairs(np.array([1, 0]))
  np.testing.assert_array_equal(batch["ids"], np.concatenate([data.chosen_ids[[1, 0]], data.rejected_ids[[1, 0]]]))
  # An answer already ending with the EOS text gets no second EOS.
  assert plain_tokenizer.decode(data.rejected_ids[1][data.rejected_attention_mask[1] == 1]) == "3+3= 7<|endoftext|>"
  assert data.chosen_completion_mask[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 0]


def test_a_prompt_that_fills_max_len_is_an_error_or_skipped(plain_tokenizer):
  long = ex(Preference("word " * 20, " yes", " no"), "d.jsonl:2")
  with pytest.raises(DataError, match=r"^d.jsonl:2: the prompt \(\d+ tokens\) leaves no room for the answer within "
                                      r"--max-seq-len 8; raise --max-seq-len, shorten the prompt, or pass "
                                      r"--skip-bad-lines"):
    tokenize_preference([ex(Preference("Q", " a", " b")), long], plain_tokenizer, max_len=8)
  data, report = tokenize_preference([ex(Preference("Q", " a", " b")), long], plain_tokenizer, max_len=8,
                                     skip_bad=True)
  assert data.where == ("d.jsonl:1",) and report.lines()[0].startswith("data: skipped 1 of 2 examples (the first: "
                                                                        "d.jsonl:2: the prompt")
  with pytest.raises(DataError, match=r"no usable examples: all 1 were skipped"):
    tokenize_unpaired([ex(Unpaired("word " * 20, " yes", True), "d.jsonl:2")], plain_tokenizer, max_len=8,
                      skip_bad=True)


def test_conversational_records_need_a_template_that_accepts_them(make_tokenizer, plain_tokenizer):
  pair = Preference((Message("user", "Hi"),), (Message("assistant", "a"),), (Message("assistant", "b"),))
  with pytest.raises(DataError, match=r"^d.jsonl:1: a conversational record needs the tokenizer's chat template"):
    tokenize_preference([ex(pair)], plain_tokenizer, max_len=64)
  bad = Preference((Message("tool", "42"),), (Message("assistant", "a"),), (Message("assistant", "b"),))
  with pytest.raises(DataError, match=r"^d.jsonl:1: the chat template of .* refuses the conversation \(Unsupported "
                                      r"role: tool\); fix the roles"):
    tokenize_preference([ex(bad)], make_tokenizer("sharegpt"), max_len=64)


def test_unpaired_data_unpairs_pairs_and_builds_kl_rows(plain_tokenizer):
  examples = [ex(Preference("2+2=", " 4", " 5, or so")), ex(Unpaired("3+3=", " 6", True), "d.jsonl:2")]
  data, _ = tokenize_unpaired(examples, plain_tokenizer, max_len=12)
  assert data.where == ("d.jsonl:1 (chosen)", "d.jsonl:1 (rejected)", "d.jsonl:2")
  assert data.label.tolist() == [True, False, True]
  kl = data.mismatched(np.array([2, 1]))
  # Row 0: prompt of example 2 with the completion of example 1; row 1: prompt of 1 with completion of 2.
  decode = lambda j: plain_tokenizer.decode(kl["ids"][j][kl["attention_mask"][j] == 1])  # noqa: E731
  assert decode(0) == "3+3= 5, or so<|endoftext|>"[:len(decode(0))] and decode(1) == "2+2= 6<|endoftext|>"
  assert kl["ids"].shape == (2, 12) and (kl["ids"][1][kl["attention_mask"][1] == 0] == data.pad_id).all()


def test_argument_errors(plain_tokenizer):
  with pytest.raises(ValueError, match=r"expected Preference records, got \['Prompted'\]"):
    tokenize_preference([ex(Prompted("p", "c"))], plain_tokenizer, max_len=8)
  with pytest.raises(ValueError, match=r"max_len must be >= 1, got 0"):
    tokenize_unpaired([ex(Unpaired("p", "c", True))], plain_tokenizer, max_len=0)
