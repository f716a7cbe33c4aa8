"""Reading and parsing in one step, skipping (and counting) bad records on request."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from jlora.data._errors import DataError
from jlora.data._read import Row, read_rows_counted
from jlora.data._records import Example, parse_preference, parse_sft, parse_unpaired, unpair

_FIX = "; fix the record or pass --skip-bad-lines"


def read_sft(paths: str | Sequence[str], *, option: str = "--data", skip_bad: bool = False
             ) -> tuple[list[Example], list[str]]:
  """Supervised examples (``Chat`` or ``Prompted``) from data files.

  Args:
    paths: as ``read_rows``.
    option: the command-line option that gave ``paths`` (errors name it).
    skip_bad: skip malformed lines and records (``--skip-bad-lines``) instead of raising.

  Returns:
    ``(examples, skipped)``: ``skipped`` holds ``"where: problem"`` for each record skipped.

  Raises:
    DataError: as ``read_rows`` and ``parse_sft``; also when every record was skipped.

  Example:
    >>> import json, os, tempfile
    >>> from jlora.data import read_sft
    >>> path = os.path.join(tempfile.mkdtemp(), "d.jsonl")
    >>> _ = open(path, "w").write(json.dumps({"prompt": "2+2=", "completion": "4"}) + "\\n{bad\\n")
    >>> examples, skipped = read_sft(path, skip_bad=True)
    >>> [e.record for e in examples], [s.split(": ", 1)[1].split(" (")[0] for s in skipped]
    ([Prompted(prompt='2+2=', completion='4')], ['not valid JSON'])
  """
  return _read(paths, option, skip_bad, lambda row: [Example(row.where, parse_sft(row))])


def read_preference(paths: str | Sequence[str], *, option: str = "--data", skip_bad: bool = False
                    ) -> tuple[list[Example], list[str]]:
  """Preference examples (``Preference``) from data files; as ``read_sft`` otherwise.

  Example:
    >>> import json, os, tempfile
    >>> from jlora.data import read_preference
    >>> path = os.path.join(tempfile.mkdtemp(), "d.jsonl")
    >>> _ = open(path, "w").write(json.dumps({"prompt": "Q", "chosen": " a", "rejected": " b"}) + "\\n")
    >>> read_preference(path)[0][0].record.chosen
    ' a'
  """
  return _read(paths, option, skip_bad, lambda row: [Example(row.where, parse_preference(row))])


def read_unpaired(paths: str | Sequence[str], *, option: str = "--data", skip_bad: bool = False
                  ) -> tuple[list[Example], list[str]]:
  """Unpaired preference examples (``Unpaired``) from data files; preference rows are unpaired.

  A row with ``chosen`` and ``rejected`` (and no ``label``) becomes two examples,
  as TRL's KTOTrainer does (see ``unpair``). As ``read_sft`` otherwise.

  Example:
    >>> import json, os, tempfile
    >>> from jlora.data import read_unpaired
    >>> path = os.path.join(tempfile.mkdtemp(), "d.jsonl")
    >>> _ = open(path, "w").write(json.dumps({"prompt": "Q", "chosen": " a", "rejected": " b"}) + "\\n")
    >>> [e.record.label for e in read_unpaired(path)[0]]
    [True, False]
  """
  return _read(paths, option, skip_bad, _unpaired)


def _unpaired(row: Row) -> list[Example]:
  value = row.value
  if isinstance(value, dict) and "chosen" in value and "rejected" in value and "label" not in value:
    return unpair([Example(row.where, parse_preference(row))])
  return [Example(row.where, parse_unpaired(row))]


def _read(paths: str | Sequence[str], option: str, skip_bad: bool, parse: Callable[[Row], list[Example]]
          ) -> tuple[list[Example], list[str]]:
  rows, skipped = read_rows_counted(paths, option=option, skip_bad=skip_bad)
  examples: list[Example] = []
  for row in rows:
    try:
      examples.extend(parse(row))
    except DataError as e:
      if not skip_bad:
        raise
      skipped.append(str(e).removesuffix(_FIX))
  if not examples:
    show = paths if isinstance(paths, str) else ",".join(paths)
    raise DataError(f"{option} {show}: no usable records: all {len(skipped)} are malformed (the first: "
                    f"{skipped[0]}); fix them")
  return examples, skipped

