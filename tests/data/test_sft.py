"""Supervised tokenization (jlora.data._sft): the former prompt/completion numbers, chats, truncation, packing."""

import os

import numpy as np
import pytest

import jlora
from jlora.data import (Chat, DataError, Example, Message, Prompted, Row, eval_prompt, parse_sft, read_sft,
                        tokenize_sft)
import legacy_tokenize as before  # the tokenization jlora.data replaced, kept as this file's oracle

TRAIN = os.path.join(os.path.dirname(jlora.__file__), "assets", "data", "reverse_words.train.jsonl")


def chat(*pairs, **kwargs):
  return Chat(tuple(Message(r, c) for r, c in pairs), **kwargs)


def ex(record, where="d.jsonl:1"):
  return Example(where, record)


@pytest.fixture(scope="module")
def bundled():
  """The bundled task's records, read by the former module's reader and by jlora.data."""
  records = before.load_records(TRAIN)
  examples, _ = read_sft(TRAIN)
  return records[:600], examples[:600]


@pytest.mark.parametrize("pack,max_len,template", [(False, 32, None), (False, 12, None), (True, 64, None),
                                                   (False, 24, "qwen3")])
def test_prompted_records_tokenize_as_before(bundled, make_tokenizer, plain_tokenizer, pack, max_len, template):
  records, examples = bundled
  assert [e.record for e in examples] == [Prompted(r.prompt, r.completion) for r in records]
  tok = make_tokenizer(template) if template else plain_tokenizer
  want = before.tokenize(records, tok, max_len=max_len, pack=pack, chat_template=bool(template))
  got, report = tokenize_sft(examples, tok, max_len=max_len, pack=pack, chat_template=bool(template) or None)
  for name in ("ids", "loss_mask", "attention_mask", "segment_ids"):
    a, b = getattr(want, name), getattr(got, name)
    assert (a is None) == (b is None), name
    if a is not None:
      assert a.dtype == b.dtype, name
      np.testing.assert_array_equal(a, b, err_msg=name)
  assert got.truncated == want.truncated == report.truncated
  assert (report.examples, report.split, report.skipped) == (600, 0, ())


def test_prompted_truncation_drops_the_prompt_from_the_left_then_the_end(plain_tokenizer):
  tok = plain_tokenizer
  rec = Prompted("Reverse the words: a b c\nAnswer:", " c b a")
  ids, mask = jlora.data.encode_prompted(tok, rec, chat_template=False)
  n_prompt = mask.index(1)
  t, report = tokenize_sft([ex(rec)], tok, max_len=len(ids) - 3)
  assert t.ids[0].tolist() == ids[3:] and report.truncated == 1
  t, _ = tokenize_sft([ex(rec)], tok, max_len=3)  # one prompt token kept, then the end cut
  assert t.ids[0].tolist() == ids[n_prompt - 1:n_prompt + 2] and t.loss_mask[0].tolist() == [0, 1, 1]


def test_conversations_keep_their_start_and_must_train_something(make_tokenizer):
  tok = make_tokenizer("sharegpt")
  long_prompt = chat(("user", "word " * 40), ("assistant", "Yes."))
  cut_answer = chat(("user", "Hi"), ("assistant", "Hello there, how are you today?"))
  full, _ = tokenize_sft([ex(cut_answer)], tok, max_len=64)
  n = int(full.attention_mask.sum())
  t, report = tokenize_sft([ex(cut_answer)], tok, max_len=n - 4)
  np.testing.assert_array_equal(t.ids[0], full.ids[0, :n - 4])
  np.testing.assert_array_equal(t.loss_mask[0], full.loss_mask[0, :n - 4])
  assert report.truncated == 1 and report.lines() == [
      f"data: 1 of 1 examples truncated to max_seq_len={n - 4}"]
  with pytest.raises(DataError, match=r"^d.jsonl:2: the prompt \(\d+ tokens before the answer\) leaves no room for "
                                      r"the answer within --max-seq-len 20; raise --max-seq-len, shorten the prompt, "
                                      r"or pass --skip-bad-lines"):
    tokenize_sft([ex(cut_answer), ex(long_prompt, "d.jsonl:2")], tok, max_len=20)
  t, report = tokenize_sft([ex(cut_answer), ex(long_prompt, "d.jsonl:2")], tok, max_len=20, skip_bad=True)
  assert len(t) == 1 and t.where == ("d.jsonl:1",)
  assert report.lines()[0].startswith("data: skipped 1 of 2 examples (the first: d.jsonl:2: the prompt (")
  with pytest.raises(DataError, match=r"no usable examples: all 1 were skipped \(the first: d.jsonl:2: the prompt"):
    tokenize_sft([ex(long_prompt, "d.jsonl:2")], tok, max_len=20, skip_bad=True)


def test_an_answer_cut_to_nothing_is_an_error(plain_tokenizer):
  with pytest.raises(DataError, match=r"^d.jsonl:1: no token is trained within --max-seq-len 1 \(truncation cut "
                                      r"the answer\); raise --max-seq-len, or pass --skip-bad-lines"):
    tokenize_sft([ex(Prompted("", "abc"))], plain_tokenizer, max_len=1)


def test_split_conversations_and_the_last_turn_only(make_tokenizer):
  tok = make_tokenizer("qwen3")
  multi = parse_sft(Row("d.jsonl:4", {"messages": [
      {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "add"},
      {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6", "reasoning_content": "add"}]}))
  single = chat(("user", "Hi"), ("assistant", "Hello."))
  t, report = tokenize_sft([ex(multi, "d.jsonl:4"), ex(single, "d.jsonl:5")], tok, max_len=64)
  assert t.where == ("d.jsonl:4 (turns 3)", "d.jsonl:4 (turns 1)", "d.jsonl:5")
  assert (report.examples, report.sequences, report.split) == (2, 3, 1)
  assert report.lines() == ["data: 1 of 2 conversations trained as several sequences (the chat template rewrites "
                            "earlier turns)"]
  last, report = tokenize_sft([ex(multi, "d.jsonl:4")], tok, max_len=64, train_on="last")
  assert last.where == ("d.jsonl:4",) and report.split == 0
  np.testing.assert_array_equal(last.loss_mask[0], t.loss_mask[0])
  assert report.trained_tokens == int(t.loss_mask[0, 1:].sum())


def test_packing_conversations_names_each_segment(make_tokenizer):
  tok = make_tokenizer("llama31")
  examples = [ex(chat(("user", f"Question {i}?"), ("assistant", f"Answer {i}.")), f"d.jsonl:{i}") for i in range(6)]
  unpacked, _ = tokenize_sft(examples, tok, max_len=128)
  packed, _ = tokenize_sft(examples, tok, max_len=64, pack=True)
  assert packed.attention_mask.all() and packed.segment_ids is not None
  lengths = unpacked.attention_mask.sum(1)
  flat = np.concatenate([unpacked.ids[i, :n] for i, n in enumerate(lengths)])
  np.testing.assert_array_equal(packed.ids.reshape(-1), flat[:packed.ids.size])
  assert packed.row_where(1) == tuple(f"d.jsonl:{s - 1}" for s in np.unique(packed.segment_ids[1]))
  # Trained: the answers, never a segment's first token.
  starts = np.flatnonzero(np.diff(packed.segment_ids.reshape(-1), prepend=0))
  assert not packed.loss_mask.reshape(-1)[starts].any()


def test_chat_template_option(make_tokenizer, plain_tokenizer):
  conv = ex(chat(("user", "Hi"), ("assistant", "Hello.")))
  with pytest.raises(DataError, match=r"^d.jsonl:1: a conversation needs the chat template; drop "
                                      r"--no-chat-template"):
    tokenize_sft([conv], make_tokenizer("qwen3"), max_len=32, chat_template=False)
  with pytest.raises(DataError, match=r"^d.jsonl:1: a conversation needs the tokenizer's chat template, and "
                                      r".*tiny-base has none; give a model whose tokenizer has one"):
    tokenize_sft([conv], plain_tokenizer, max_len=32)
  with pytest.raises(DataError, match=r"--chat-template: this model's tokenizer has no chat template; drop "
                                      r"--chat-template"):
    tokenize_sft([ex(Prompted("p", "c"))], plain_tokenizer, max_len=32, chat_template=True)
  # A wrapped prompt is the conversation's prompt: the same tokens as a chat with that user turn, up to the answer.
  tok = make_tokenizer("sharegpt")
  wrapped, _ = tokenize_sft([ex(Prompted("Hi", " Hello."))], tok, max_len=32, chat_template=True)
  assert tok.decode(wrapped.ids[0][wrapped.attention_mask[0] == 1]) == "Human: Hi\n\nAssistant: Hello.<|endoftext|>"


def test_argument_and_tokenizer_errors(plain_tokenizer):
  with pytest.raises(ValueError, match=r"max_len must be >= 1, got 0"):
    tokenize_sft([ex(Prompted("p", "c"))], plain_tokenizer, max_len=0)
  with pytest.raises(ValueError, match=r"train_on must be 'all' or 'last', got 'first'"):
    tokenize_sft([ex(Prompted("p", "c"))], plain_tokenizer, max_len=8, train_on="first")
  with pytest.raises(ValueError, match=r"tokenize_sft takes Chat and Prompted records, got \['Preference'\]"):
    tokenize_sft([ex(jlora.data.Preference("p", "a", "b"))], plain_tokenizer, max_len=8)

  class NoEos:
    eos_token_id = None
    chat_template = None

  with pytest.raises(DataError, match=r"prompt/completion records end with the EOS token, and the tokenizer has none"):
    tokenize_sft([ex(Prompted("p", "c"))], NoEos(), max_len=8)


def test_eval_prompts(make_tokenizer, plain_tokenizer):
  assert eval_prompt(Prompted("2+2=", " 4"), plain_tokenizer) == (plain_tokenizer("2+2=")["input_ids"], " 4")
  tok = make_tokenizer("gemma3")
  conv = chat(("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Goodbye."))
  ids, target = eval_prompt(conv, tok)
  assert target == "Goodbye." and tok.decode(ids).endswith("Bye<end_of_turn>\n<start_of_turn>model\n")
  wrapped, _ = eval_prompt(Prompted("Hi", "Hello."), tok, chat_template=True)
  assert tok.decode(wrapped) == "<|endoftext|><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
  with pytest.raises(DataError, match=r"the chat template of .* refuses the conversation before its last answer "
                                      r"\(Conversation roles must alternate"):
    eval_prompt(chat(("user", "a"), ("user", "b"), ("assistant", "c")), tok)
