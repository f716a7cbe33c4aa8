"""Data loading, masking, truncation, packing and deterministic batches."""

import json

import numpy as np
import pytest

from jlora.finetune import data as data_lib


class CharTokenizer:
  """A tiny deterministic tokenizer: one id per character, EOS = 0."""

  eos_token_id = 0
  pad_token_id = 0
  chat_template = None

  def __call__(self, text, add_special_tokens=False):
    return {"input_ids": [ord(c) % 250 + 1 for c in text]}


def write(tmp_path, name, lines):
  p = tmp_path / name
  p.write_text("\n".join(lines) + "\n")
  return str(p)


def test_all_record_formats(tmp_path):
  path = write(tmp_path, "d.jsonl", [
      json.dumps({"prompt": "p1", "completion": "c1"}),
      json.dumps({"input": "p2", "target": "c2"}),
      json.dumps({"instruction": "i3", "input": "x3", "output": "c3"}),
      json.dumps({"instruction": "i4", "output": "c4"}),
      json.dumps({"text": "plain"}),
      "",
  ])
  recs, skipped = data_lib.load_records(path)
  assert skipped == 0
  assert [(r.prompt, r.completion) for r in recs] == [
      ("p1", "c1"), ("p2", "c2"), ("i3\nx3", "c3"), ("i4", "c4"), ("", "plain")]


def test_plain_text_blocks(tmp_path):
  p = tmp_path / "t.txt"
  p.write_text("first block\nline two\n\n\nsecond block\n")
  recs, _ = data_lib.load_records(str(p))
  assert [r.completion for r in recs] == ["first block\nline two", "second block"]


@pytest.mark.parametrize("line,match", [
    ("{not json", r"d.jsonl:2: Expecting property name"),
    (json.dumps({"question": "q"}), r"d.jsonl:2: no known fields \(have \['question'\]\)"),
    (json.dumps({"prompt": "p", "completion": 3}), r"d.jsonl:2: prompt and completion must be strings"),
    (json.dumps([1, 2]), r"d.jsonl:2: expected a JSON object"),
    (json.dumps({"prompt": "p", "completion": ""}), r"d.jsonl:2: empty completion"),
])
def test_bad_line_errors_name_the_line(tmp_path, line, match):
  path = write(tmp_path, "d.jsonl", [json.dumps({"prompt": "a", "completion": "b"}), line])
  with pytest.raises(data_lib.DataError, match=match + r".*--skip-bad-lines"):
    data_lib.load_records(path)
  recs, skipped = data_lib.load_records(path, skip_bad_lines=True)
  assert (len(recs), skipped) == (1, 1)


def test_missing_and_empty_files(tmp_path):
  with pytest.raises(data_lib.DataError, match=r"--data '.*nope.jsonl': no such file"):
    data_lib.load_records(str(tmp_path / "nope.jsonl"))
  with pytest.raises(data_lib.DataError, match=r"--eval-data .* is not a file"):
    data_lib.load_records(str(tmp_path), option="--eval-data")
  path = write(tmp_path, "e.jsonl", ["{bad"])
  with pytest.raises(data_lib.DataError, match=r"no usable records \(all 1 lines are malformed\); give one JSON"):
    data_lib.load_records(path, skip_bad_lines=True)
  (tmp_path / "empty.txt").write_text("\n\n")
  with pytest.raises(data_lib.DataError, match=r"--data .*empty.txt: no usable records \(the file is empty\)"):
    data_lib.load_records(str(tmp_path / "empty.txt"))
  (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00")
  with pytest.raises(data_lib.DataError, match="not UTF-8 text"):
    data_lib.load_records(str(tmp_path / "binary.jsonl"))


def test_prompt_tokens_are_masked_out_of_the_loss():
  tok = CharTokenizer()
  t = data_lib.tokenize([data_lib.Record("abc", "de")], tok, max_len=8)
  assert t.ids[0].tolist() == [ord(c) % 250 + 1 for c in "abcde"] + [0, 0, 0]
  assert t.loss_mask[0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]  # completion + EOS
  assert t.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]


def test_truncation_drops_prompt_first():
  tok = CharTokenizer()
  t = data_lib.tokenize([data_lib.Record("abcdefgh", "xy")], tok, max_len=6)
  assert t.truncated == 1
  # 11 tokens (8 prompt + 2 + EOS) into 6: drop the 5 oldest prompt tokens.
  assert t.loss_mask[0].tolist() == [0, 0, 0, 1, 1, 1]
  assert t.ids[0, :3].tolist() == [ord(c) % 250 + 1 for c in "fgh"]
  t = data_lib.tokenize([data_lib.Record("a", "xyzwvu")], tok, max_len=4)
  assert t.loss_mask[0].tolist() == [0, 1, 1, 1]  # completion cut at the end


def test_packing_fills_rows():
  tok = CharTokenizer()
  recs = [data_lib.Record("ab", "cd")] * 5  # 5 tokens each with EOS
  t = data_lib.tokenize(recs, tok, max_len=8, pack=True)
  assert t.ids.shape == (3, 8) and t.attention_mask.all()
  assert t.loss_mask.reshape(-1).tolist()[:10] == [0, 0, 1, 1, 1, 0, 0, 1, 1, 1]
  # One segment id per example (attention stays inside it); a row boundary starts a new segment.
  assert t.segment_ids.reshape(-1).tolist()[:12] == [1] * 5 + [2] * 5 + [3, 3]
  assert t.segment_ids[1].tolist() == [2, 2, 3, 3, 3, 3, 3, 4]
  # Text records: the first token of an example is never a target predicted from the one before.
  plain = data_lib.tokenize([data_lib.Record("", "abc")] * 4, tok, max_len=8, pack=True)
  assert plain.loss_mask[0].tolist() == [1, 1, 1, 1, 0, 1, 1, 1]
  batch = data_lib.Batches(t, batch_size=1, grad_accum=1, seed=0).get(0)
  assert batch["segment_ids"].shape == (1, 1, 8)


def test_chat_template_requires_one():
  with pytest.raises(data_lib.DataError, match="no chat template"):
    data_lib.tokenize([data_lib.Record("a", "b")], CharTokenizer(), max_len=8, chat_template=True)


def test_batches_are_deterministic_and_cover_each_epoch():
  tok = CharTokenizer()
  t = data_lib.tokenize([data_lib.Record(str(i), "x") for i in range(10)], tok, max_len=4)
  b = data_lib.Batches(t, batch_size=2, grad_accum=2, seed=3)
  assert b.steps_per_epoch == 2
  assert b.get(1)["ids"].shape == (2, 2, 4)
  np.testing.assert_array_equal(b.indices(3), data_lib.Batches(t, batch_size=2, grad_accum=2, seed=3).indices(3))
  epoch0 = np.concatenate([b.indices(0), b.indices(1)]).reshape(-1)
  assert len(set(epoch0.tolist())) == 8
  assert not np.array_equal(b.indices(0), b.indices(2))  # reshuffled next epoch
  # Two processes hold the two halves of every micro-batch of the one-process batch.
  halves = [data_lib.Batches(t, batch_size=2, grad_accum=2, seed=3, process_index=i, process_count=2).indices(5)
            for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves, axis=1), b.indices(5))
  with pytest.raises(data_lib.DataError, match="--batch-size 3 does not split over 2 processes"):
    data_lib.Batches(t, batch_size=3, grad_accum=1, seed=0, process_count=2)
  with pytest.raises(data_lib.DataError, match=r"fewer than one batch .*; lower --batch-size"):
    data_lib.Batches(t, batch_size=8, grad_accum=2, seed=0)
