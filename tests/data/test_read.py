"""Reading data files (jlora.data._read): every format, several files, directories, and the errors."""

import json
import os
import sys

import pytest

from jlora.data import DataError, read_rows

ROWS = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+3=", "completion": "6"}]


def write_jsonl(path, values, blank_after_first=False):
  lines = [json.dumps(v) for v in values]
  if blank_after_first:
    lines.insert(1, "")
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def found(rows):
  return [(os.path.basename(r.where), r.value) for r in rows]


def test_jsonl_names_lines(tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", ROWS, blank_after_first=True)
  assert found(read_rows(path)) == [("d.jsonl:1", ROWS[0]), ("d.jsonl:3", ROWS[1])]


def test_json_array(tmp_path):
  (tmp_path / "d.json").write_text(json.dumps(ROWS, indent=2))
  assert found(read_rows(str(tmp_path / "d.json"))) == [("d.json[0]", ROWS[0]), ("d.json[1]", ROWS[1])]


def test_text_blocks_name_their_first_line(tmp_path):
  (tmp_path / "t.txt").write_text("first block\nline two\n\n\nsecond block\n")
  assert found(read_rows(str(tmp_path / "t.txt"))) == [
      ("t.txt:1", {"text": "first block\nline two"}), ("t.txt:5", {"text": "second block"})]


@pytest.fixture(scope="module")
def arrow_files(tmp_path_factory):
  """A Parquet file, a save_to_disk Dataset and DatasetDicts (one and two splits) of the same rows.

  The rows' messages have tool_calls on some messages only: Arrow fills the others with null.
  """
  import datasets
  datasets.disable_progress_bars()
  chat = [{"messages": [{"role": "user", "content": "Weather?"},
                        {"role": "assistant", "content": "", "tool_calls": [
                            {"type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
                        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]},
          {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
  root = tmp_path_factory.mktemp("arrow")
  ds = datasets.Dataset.from_list(chat)
  ds.to_parquet(str(root / "d.parquet"))
  ds.save_to_disk(str(root / "saved"))
  datasets.DatasetDict({"train": ds}).save_to_disk(str(root / "one_split"))
  datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(root / "two_splits"))
  return root, chat


@pytest.mark.parametrize("name,where", [("d.parquet", "d.parquet"), ("saved", "saved"),
                                        ("one_split", "train")])
def test_parquet_and_datasets_directories(arrow_files, name, where):
  root, chat = arrow_files
  rows = read_rows(str(root / name))
  # Keys Arrow filled with null (tool_calls of the messages that had none) are dropped again.
  assert found(rows) == [(f"{where}[0]", chat[0]), (f"{where}[1]", chat[1])]


def test_a_datasetdict_with_several_splits_asks_for_one(arrow_files):
  root, _ = arrow_files
  with pytest.raises(DataError, match=r"--data '.*two_splits': a datasets DatasetDict with splits test, train; give "
                                      r"one split's folder: .*two_splits/test, .*two_splits/train"):
    read_rows(str(root / "two_splits"))
  assert len(read_rows(str(root / "two_splits" / "test"))) == 2


def test_several_files_a_list_and_a_directory(tmp_path):
  a = write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
  (tmp_path / "b.json").write_text(json.dumps(ROWS[1:]))
  (tmp_path / "notes.md").write_text("not data")  # other files in a directory are not read
  (tmp_path / ".hidden.jsonl").write_text("{bad")
  want = [("a.jsonl:1", ROWS[0]), ("b.json[0]", ROWS[1])]
  assert found(read_rows(f"{a},{tmp_path / 'b.json'}")) == want
  assert found(read_rows([a, str(tmp_path / "b.json")])) == want
  assert found(read_rows(str(tmp_path))) == want


def test_bad_json_lines_name_the_line_or_are_skipped(tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", ROWS)
  with open(path, "a") as f:
    f.write("{not json\n")
  with pytest.raises(DataError, match=r"d.jsonl:3: not valid JSON \(Expecting property name enclosed in double "
                                      r"quotes, column 2\); fix the line or pass --skip-bad-lines"):
    read_rows(path)
  assert len(read_rows(path, skip_bad=True)) == 2
  (tmp_path / "bad.jsonl").write_text("{bad\n")
  with pytest.raises(DataError, match=r"--data .*bad.jsonl: no usable records: all 1 lines are malformed \(the "
                                      r"first: .*bad.jsonl:1: not valid JSON"):
    read_rows(str(tmp_path / "bad.jsonl"), skip_bad=True)


@pytest.mark.parametrize("name,content,match", [
    ("d.json", '{"prompt": "a"}', r"--eval-data .*d.json: a .json file must hold an array of objects, found a JSON "
                                  r"dict; write an array, or use .jsonl"),
    ("d.json", '[{"prompt": "a"},\n oops]', r".*d.json:2: not valid JSON \(Expecting value, column 2\); fix the file"),
    ("e.jsonl", "\n\n", r"--eval-data .*e.jsonl: no records \(the file is empty\)"),
    ("e.txt", "\n \n\n", r"--eval-data .*e.txt: no records \(the file is empty\)"),
    ("d.csv", "a,b", r"--eval-data '.*d.csv': unknown file type .csv; use .jsonl \(one JSON object per line\), "
                     r".json \(an array of objects\), .parquet, .txt \(plain text\), or a directory written by "
                     r"datasets' save_to_disk"),
    ("d.parquet", "not parquet", r"--eval-data .*d.parquet: not a readable Parquet file"),
])
def test_file_errors_name_the_option_the_file_and_the_fix(tmp_path, name, content, match):
  (tmp_path / name).write_text(content)
  with pytest.raises(DataError, match=match):
    read_rows(str(tmp_path / name), option="--eval-data")


def test_missing_paths_empty_directories_and_binary_files(tmp_path):
  with pytest.raises(DataError, match=r"--data '.*nope.jsonl': no such file or directory"):
    read_rows(str(tmp_path / "nope.jsonl"))
  with pytest.raises(DataError, match=r"--data: no data given"):
    read_rows(",")
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match=r"--data '.*empty': a directory with no data files \(.jsonl, .json, "
                                      r".parquet, .txt\) that is not a datasets save_to_disk directory"):
    read_rows(str(tmp_path / "empty"))
  (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00")
  with pytest.raises(DataError, match=r"--data .*binary.jsonl: not UTF-8 text .*; save the file as UTF-8"):
    read_rows(str(tmp_path / "binary.jsonl"))
  (tmp_path / "saved").mkdir()
  (tmp_path / "saved" / "state.json").write_text("{}")
  with pytest.raises(DataError, match=r"--data .*saved: not a readable datasets directory"):
    read_rows(str(tmp_path / "saved"))


@pytest.mark.parametrize("module,name", [("pyarrow.parquet", "d.parquet"), ("datasets", "saved")])
def test_a_missing_extra_says_how_to_install_it(arrow_files, monkeypatch, module, name):
  root, _ = arrow_files
  monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
  with pytest.raises(DataError, match=rf"--data .*{name}: reading it needs {module.split('.')[0]} .*; install it "
                                      r"with: pip install 'jlora\[data\]'"):
    read_rows(str(root / name))
