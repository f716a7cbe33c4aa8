"""The one error type of ``jlora.data``: bad data, named by file and line, with the fix."""

from __future__ import annotations


class DataError(ValueError):
  """A missing, unreadable or malformed data file, record or example.

  The message leads with where the problem is (``--data d.jsonl``, ``d.jsonl:4``,
  ``d.parquet[12]``), says what was found and what was expected, and names the
  fix (an option such as ``--max-seq-len`` or ``--skip-bad-lines``, or an edit of
  the data). A command prints it as one line.

  Example:
    >>> from jlora.data import DataError
    >>> issubclass(DataError, ValueError)
    True
  """
