"""--show-example (jlora.data._show): trained tokens marked with brackets or colour."""

import numpy as np
import pytest

from jlora.data import (Chat, DataError, Example, Message, Preference, Prompted, Unpaired, show_example,
                        tokenize_preference, tokenize_sft, tokenize_unpaired)


@pytest.fixture(scope="module")
def conversation(make_tokenizer):
  tok = make_tokenizer("gemma3")
  record = Chat((Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "Bye"),
                 Message("assistant", "Goodbye.")))
  data, _ = tokenize_sft([Example("d.jsonl:7", record)], tok, max_len=64)
  return tok, data


def test_brackets(conversation):
  tok, data = conversation
  n, trained = int(data.attention_mask[0].sum()), int(data.loss_mask[0].sum())
  assert show_example(data, 0, tok, color=False) == (
      f"example 0 of 1: d.jsonl:7 ({n} tokens, {trained} trained, in [[ ]])\n"
      "<|endoftext|><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n[[Hello!<end_of_turn>\n]]"
      "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n[[Goodbye.<end_of_turn>\n]]")


def test_colour(conversation, monkeypatch):
  tok, data = conversation
  text = show_example(data, 0, tok, color=True)
  assert "in bold green" in text and "\x1b[1;32mHello!<end_of_turn>\n\x1b[0m" in text and "[[" not in text
  monkeypatch.setattr("sys.stdout.isatty", lambda: False)
  assert "[[Hello!" in show_example(data, 0, tok)  # the default follows the terminal


def test_packed_rows_name_each_sequence(plain_tokenizer):
  examples = [Example(f"d.jsonl:{i}", Prompted(f"{i}+{i}=", f" {2 * i}")) for i in range(1, 5)]
  data, _ = tokenize_sft(examples, plain_tokenizer, max_len=12, pack=True)
  text = show_example(data, 0, plain_tokenizer, color=False)
  assert text.startswith("example 0 of 2: d.jsonl:1; d.jsonl:2 (12 tokens, ")
  assert text.endswith("\n1+1=[[ 2<|endoftext|>]]\n--- d.jsonl:2 ---\n2+2=[[ 4]]")  # the row ends before its EOS


def test_preference_and_unpaired_rows(plain_tokenizer):
  pairs, _ = tokenize_preference([Example("d.jsonl:1", Preference("2+2=", " 4", " 5"))], plain_tokenizer, max_len=8)
  assert show_example(pairs, 0, plain_tokenizer, color=False) == (
      "example 0 of 1: d.jsonl:1 (answers in [[ ]])\nchosen (7 tokens, 3 trained):\n2+2=[[ 4<|endoftext|>]]\n"
      "rejected (7 tokens, 3 trained):\n2+2=[[ 5<|endoftext|>]]")
  unpaired, _ = tokenize_unpaired([Example("d.jsonl:1", Unpaired("2+2=", " 5", False))], plain_tokenizer, max_len=8)
  assert show_example(unpaired, 0, plain_tokenizer, color=False) == (
      "example 0 of 1: d.jsonl:1, undesirable (7 tokens, 3 trained, in [[ ]])\n2+2=[[ 5<|endoftext|>]]")


def test_a_row_out_of_range(conversation):
  tok, data = conversation
  with pytest.raises(DataError, match=r"--show-example 3: the data holds 1 sequences; give 0 to 0"):
    show_example(data, 3, tok)
  assert np.asarray(data.ids).shape == (1, 64)
