"""One tokenized example as text, with its trained tokens marked (``--show-example``)."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from jlora.data._errors import DataError
from jlora.data._preference import TokenizedPreference, TokenizedUnpaired
from jlora.data._sft import TokenizedSFT

_ON, _OFF = "\x1b[1;32m", "\x1b[0m"  # trained tokens: bold green on a terminal


def show_example(data: TokenizedSFT | TokenizedPreference | TokenizedUnpaired, i: int, tokenizer: Any, *,
                 color: bool | None = None) -> str:
  """Row ``i`` of tokenized data as text, the trained tokens marked.

  Trained tokens are bold green when ``color`` (default: when stdout is a
  terminal), else enclosed in ``[[`` and ``]]``. A header names where the row
  came from and counts its tokens; padding is not shown. A packed row shows each
  sequence after a ``--- where ---`` line. Preference data shows the chosen and
  the rejected sequence (their answers marked), unpaired data its label.

  Raises:
    DataError: ``i`` is not a row of ``data`` (``--show-example``).

  Example:
    >>> from transformers import AutoTokenizer
    >>> from jlora.data import Example, Prompted, show_example, tokenize_sft
    >>> import jlora, os
    >>> tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(jlora.__file__), "assets", "tiny-base"))
    >>> data, _ = tokenize_sft([Example("d.jsonl:1", Prompted("2+2=", "4"))], tok, max_len=8)
    >>> print(show_example(data, 0, tok, color=False))
    example 0 of 1: d.jsonl:1 (6 tokens, 2 trained, in [[ ]])
    2+2=[[4<|endoftext|>]]
  """
  if not 0 <= i < len(data):
    raise DataError(f"--show-example {i}: the data holds {len(data)} sequences; give 0 to {len(data) - 1}")
  color = sys.stdout.isatty() if color is None else color
  how = "in bold green" if color else "in [[ ]]"
  if isinstance(data, TokenizedPreference):
    parts = []
    for name in ("chosen", "rejected"):
      ids, am, cm = (getattr(data, f"{name}_{k}")[i] for k in ("ids", "attention_mask", "completion_mask"))
      parts.append(f"{name} ({int(am.sum())} tokens, {int(cm.sum())} trained):\n"
                   f"{_marked(tokenizer, ids, cm, am, None, (), color)}")
    return f"example {i} of {len(data)}: {data.where[i]} (answers {how})\n" + "\n".join(parts)
  if isinstance(data, TokenizedUnpaired):
    am, cm = data.attention_mask[i], data.completion_mask[i]
    label = "desirable" if data.label[i] else "undesirable"
    return (f"example {i} of {len(data)}: {data.where[i]}, {label} ({int(am.sum())} tokens, {int(cm.sum())} "
            f"trained, {how})\n{_marked(tokenizer, data.ids[i], cm, am, None, (), color)}")
  am, lm = data.attention_mask[i], data.loss_mask[i]
  seg = None if data.segment_ids is None else data.segment_ids[i]
  wheres = data.row_where(i)
  return (f"example {i} of {len(data)}: {'; '.join(wheres)} ({int(am.sum())} tokens, {int(lm.sum())} trained, "
          f"{how})\n{_marked(tokenizer, data.ids[i], lm, am, seg, data.where, color)}")


def _marked(tokenizer: Any, ids: np.ndarray, trained: np.ndarray, attention: np.ndarray, seg: np.ndarray | None,
            where: tuple[str, ...], color: bool) -> str:
  """The attended tokens decoded run by run (a run: same trained flag and segment), trained runs marked."""
  keep = np.flatnonzero(attention)
  out: list[str] = []
  run: list[int] = []
  key = None
  for t in keep:
    k = (bool(trained[t]), None if seg is None else int(seg[t]))
    if key is not None and k != key:
      out.append(_run(tokenizer, run, key, color))
      run = []
      if k[1] != key[1]:
        out.append(f"\n--- {where[k[1] - 1]} ---\n")
    run.append(int(ids[t]))
    key = k
  if run:
    out.append(_run(tokenizer, run, key, color))
  return "".join(out)


def _run(tokenizer: Any, ids: list[int], key: tuple[bool, Any], color: bool) -> str:
  text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
  if not key[0]:
    return text
  return f"{_ON}{text}{_OFF}" if color else f"[[{text}]]"
