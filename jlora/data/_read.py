"""Reading data files into rows that remember where they came from.

Formats, chosen by the file's suffix (or, for a directory, by what it holds):

* ``.jsonl``: one JSON object per line (blank lines skipped); ``where`` is ``"file:line"``.
* ``.json``: one JSON array of objects; ``where`` is ``"file[i]"``.
* ``.parquet``: read with ``pyarrow`` (the reader ``datasets`` uses); ``"file[i]"``.
* a directory written by ``datasets``' ``Dataset.save_to_disk`` (read with
  ``datasets.load_from_disk``); ``"dir[i]"``. A ``DatasetDict`` directory holds one
  folder per split: name the split's folder (``dir/train``), or the only split is used.
* ``.txt``: plain text, one ``{"text": block}`` row per blank-line-separated block;
  ``"file:line"`` of the block's first line.
* any other directory: its data files (the suffixes above, not hidden, not recursive),
  in name order.

Parquet and ``datasets`` directories need the optional extra ``jlora[data]``.
Arrow (Parquet, ``datasets``) stores a key that a row lacks as null when other rows
have it (a ``tool_calls`` field on some messages only), and templates test for the
key's presence; so keys whose value is null are dropped from Arrow rows, at every
depth.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from jlora.data._errors import DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")  # the file types read_rows accepts
_FORMATS = ".jsonl (one JSON object per line), .json (an array of objects), .parquet, .txt (plain text)"


@dataclasses.dataclass(frozen=True)
class Row:
  """One record as read from a file, before it is parsed.

  Example:
    >>> from jlora.data import Row
    >>> Row("d.jsonl:3", {"text": "hello"}).where
    'd.jsonl:3'
  """

  where: str  # "file:line" (JSONL, text) or "file[i]" (JSON array, Parquet, datasets); for messages
  value: Any  # the decoded JSON value or Arrow row: a dict for well-formed data


def read_rows(paths: str | Sequence[str], *, option: str = "--data", skip_bad: bool = False) -> list[Row]:
  """Reads data files into rows, each naming its file and line (or index).

  Args:
    paths: a file, a directory (a ``datasets`` ``save_to_disk`` directory, or one
      holding data files), a comma-separated string of them, or a sequence of them.
    option: the command-line option that gave ``paths`` (errors name it).
    skip_bad: skip JSONL lines that are not valid JSON instead of raising. The
      ``read_sft`` family also counts what was skipped.

  Returns:
    The rows of every file, in order.

  Raises:
    DataError: a missing path, an unknown suffix, an unreadable or empty file, a
      JSONL line that is not JSON (unless ``skip_bad``), or a missing optional
      dependency (``pip install 'jlora[data]'``).

  Example:
    >>> import json, os, tempfile
    >>> from jlora.data import read_rows
    >>> path = os.path.join(tempfile.mkdtemp(), "d.jsonl")
    >>> _ = open(path, "w").write(json.dumps({"prompt": "2+2=", "completion": "4"}) + "\\n")
    >>> [(os.path.basename(r.where), r.value) for r in read_rows(path)]
    [('d.jsonl:1', {'prompt': '2+2=', 'completion': '4'})]
  """
  rows, _ = read_rows_counted(paths, option=option, skip_bad=skip_bad)
  return rows


def read_rows_counted(paths: str | Sequence[str], *, option: str, skip_bad: bool) -> tuple[list[Row], list[str]]:
  """``read_rows``, and the problems of the lines it skipped (``"where: what"``)."""
  rows: list[Row] = []
  skipped: list[str] = []
  for path in _expand(paths, option):
    n_skipped = len(skipped)
    got = _read_one(path, option, skip_bad, skipped)
    if not got and len(skipped) == n_skipped:
      raise DataError(f"{option} {path}: no records (the file is empty); give a file with records or leave it out")
    rows.extend(got)
  if not rows:
    raise DataError(f"{option} {_show(paths)}: no usable records: all {len(skipped)} lines are malformed "
                    f"(the first: {skipped[0]}); fix them")
  return rows, skipped


def _show(paths: str | Sequence[str]) -> str:
  return paths if isinstance(paths, str) else ",".join(paths)


def _expand(paths: str | Sequence[str], option: str) -> list[str]:
  """The files and ``datasets`` directories that ``paths`` names, checked to exist."""
  if isinstance(paths, str):
    items = [paths] if os.path.exists(paths) else [p.strip() for p in paths.split(",") if p.strip()]
  else:
    items = [str(p) for p in paths]
  if not items:
    raise DataError(f"{option}: no data given; give a file, a directory, or a comma-separated list of them")
  out = []
  for p in items:
    if not os.path.exists(p):
      raise DataError(f"{option} {p!r}: no such file or directory")
    if os.path.isdir(p):
      out.extend(_expand_dir(p, option))
    elif p.endswith(SUFFIXES):
      out.append(p)
    else:
      ext = os.path.splitext(p)[1] or "(none)"
      raise DataError(f"{option} {p!r}: unknown file type {ext}; use {_FORMATS}, or a directory "
                      "written by datasets' save_to_disk")
  return out


def _expand_dir(path: str, option: str) -> list[str]:
  names = set(os.listdir(path))
  if "dataset_info.json" in names or "state.json" in names:
    return [path]
  if "dataset_dict.json" in names:
    splits = sorted(n for n in names if os.path.isdir(os.path.join(path, n)))
    if len(splits) == 1:
      return [os.path.join(path, splits[0])]
    choices = ", ".join(os.path.join(path, s) for s in splits)
    raise DataError(f"{option} {path!r}: a datasets DatasetDict with splits {', '.join(splits)}; "
                    f"give one split's folder: {choices}")
  files = sorted(n for n in names if n.endswith(SUFFIXES) and not n.startswith(".")
                 and os.path.isfile(os.path.join(path, n)))
  if not files:
    raise DataError(f"{option} {path!r}: a directory with no data files ({', '.join(SUFFIXES)}) that is not a "
                    "datasets save_to_disk directory either; give a data file or such a directory")
  return [os.path.join(path, n) for n in files]


def _read_one(path: str, option: str, skip_bad: bool, skipped: list[str]) -> list[Row]:
  if os.path.isdir(path):
    return _read_datasets_dir(path, option)
  if path.endswith(".parquet"):
    return _read_parquet(path, option)
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise DataError(f"{option} {path}: not UTF-8 text ({e}); save the file as UTF-8") from None
  if path.endswith(".jsonl"):
    return list(_read_jsonl(path, text, skip_bad, skipped))
  if path.endswith(".json"):
    return _read_json(path, text, option)
  return list(_read_text(path, text))


def _read_jsonl(path: str, text: str, skip_bad: bool, skipped: list[str]) -> Iterator[Row]:
  for lineno, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    try:
      value = json.loads(line)
    except json.JSONDecodeError as e:
      problem = f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})"
      if skip_bad:
        skipped.append(problem)
        continue
      raise DataError(f"{problem}; fix the line or pass --skip-bad-lines") from None
    yield Row(f"{path}:{lineno}", value)


def _read_json(path: str, text: str, option: str) -> list[Row]:
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); fix the file") from None
  if not isinstance(value, list):
    raise DataError(f"{option} {path}: a .json file must hold an array of objects, found a JSON "
                    f"{type(value).__name__}; write an array, or use .jsonl with one object per line")
  return [Row(f"{path}[{i}]", v) for i, v in enumerate(value)]


def _read_text(path: str, text: str) -> Iterator[Row]:
  """One row per blank-line-separated block (``"\\n\\n"``), stripped; empty blocks dropped."""
  offset = 0
  for block in text.split("\n\n"):
    stripped = block.strip()
    if stripped:
      start = offset + block.index(stripped[0])
      yield Row(f"{path}:{text.count(chr(10), 0, start) + 1}", {"text": stripped})
    offset += len(block) + 2


def _import(module: str, path: str, option: str) -> Any:
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise DataError(f"{option} {path}: reading it needs {module.split('.')[0]} ({e}); install it with: "
                    "pip install 'jlora[data]'") from None


def _read_parquet(path: str, option: str) -> list[Row]:
  pq = _import("pyarrow.parquet", path, option)
  try:
    batches = pq.ParquetFile(path).iter_batches()
    values = [v for b in batches for v in b.to_pylist()]
  except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
    raise DataError(f"{option} {path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
  return [Row(f"{path}[{i}]", drop_nulls(v)) for i, v in enumerate(values)]


def _read_datasets_dir(path: str, option: str) -> list[Row]:
  datasets = _import("datasets", path, option)
  try:
    ds = datasets.load_from_disk(path)
  except Exception as e:  # datasets raises FileNotFoundError, ValueError, ... for a damaged directory
    raise DataError(f"{option} {path}: not a readable datasets directory ({type(e).__name__}: {e}); "
                    "write it with Dataset.save_to_disk") from None
  return [Row(f"{path}[{i}]", drop_nulls(v)) for i, v in enumerate(ds.to_list())]


def drop_nulls(value: Any) -> Any:
  """``value`` without the dict keys whose value is None, at every depth (Arrow rows)."""
  if isinstance(value, dict):
    return {k: drop_nulls(v) for k, v in value.items() if v is not None}
  if isinstance(value, list):
    return [drop_nulls(v) for v in value]
  return value
