"""Preference (DPO) and unpaired preference (KTO) examples as token arrays, as TRL 1.16 makes them.

Tokenization follows TRL's ``DPOTrainer._prepare_dataset`` / ``KTOTrainer._prepare_dataset``:

* standard (string) records: the EOS text is appended to each answer that does not
  end with it; ``prompt_ids = tokenizer(prompt)`` and ``full = tokenizer(prompt +
  answer)`` (the tokenizer's own special tokens, e.g. a BOS, included);
* conversational records: ``prompt_ids`` is the prompt through the chat template
  with the generation prompt, ``full`` the prompt and the answer (the template's
  end of turn included; an empty reasoning block the template writes is part of
  the answer, as in TRL);
* the prompt is the longest common prefix of ``prompt_ids`` and ``full`` (for DPO,
  the shorter of the two answers' prefixes), the answer the rest. When the prefix
  is shorter than ``prompt_ids`` (BPE merged the prompt's end with the answer, or
  the template renders the prompt differently alone), TRL warns once; the report
  counts such examples (``prompt_merged``);
* an example whose prompt alone fills ``max_len`` trains nothing: TRL drops it;
  here it is an error naming it, or skipped and counted with ``skip_bad``;
* truncation keeps the start (``prompt + answer`` cut to ``max_len``), as TRL's
  collators do with their default ``keep_start``; the arrays are right-padded to
  ``max_len`` (TRL pads to the longest row of each batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jlora.data._errors import DataError
from jlora.data._records import Example, Preference, Unpaired, unpair
from jlora.data._render import TemplateFailure, chat_ids, common_prefix_length, template_name


@dataclasses.dataclass(frozen=True)
class TokenizedPreference:
  """Preference pairs as arrays: each ``(n, max_len)``, right-padded; ``completion_mask`` marks the answer.

  ``pairs(rows)`` stacks a batch as TRL's ``DataCollatorForPreference`` does:
  the chosen rows, then the rejected rows.

  Example:
    >>> import numpy as np
    >>> from jlora.data import TokenizedPreference
    >>> z = np.zeros((2, 4), np.int32)
    >>> t = TokenizedPreference(chosen_ids=z, chosen_attention_mask=z, chosen_completion_mask=z, rejected_ids=z,
    ...                         rejected_attention_mask=z, rejected_completion_mask=z, where=("a", "b"))
    >>> t.pairs(np.array([1]))["ids"].shape
    (2, 4)
  """

  chosen_ids: np.ndarray  # (n, max_len) int32: prompt + chosen answer, cut to max_len
  chosen_attention_mask: np.ndarray  # (n, max_len) int32
  chosen_completion_mask: np.ndarray  # (n, max_len) int32: 1 on the chosen answer's tokens
  rejected_ids: np.ndarray  # the same for the rejected answer
  rejected_attention_mask: np.ndarray
  rejected_completion_mask: np.ndarray
  where: tuple[str, ...]  # per pair: "file:line"

  def __len__(self) -> int:
    return self.chosen_ids.shape[0]

  def pairs(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Pairs ``rows`` as one batch of ``2 * len(rows)`` sequences: chosen first, then rejected."""
    return {
        "ids": np.concatenate([self.chosen_ids[rows], self.rejected_ids[rows]]),
        "attention_mask": np.concatenate([self.chosen_attention_mask[rows], self.rejected_attention_mask[rows]]),
        "completion_mask": np.concatenate([self.chosen_completion_mask[rows],
                                           self.rejected_completion_mask[rows]]),
    }


@dataclasses.dataclass(frozen=True)
class TokenizedUnpaired:
  """Unpaired preference examples as arrays, and what KTO's KL term needs.

  KTO estimates its KL reference point from *mismatched* pairs: TRL pairs each
  prompt ``x_i`` with the completion ``y_{i-1}`` of the example before it in the
  same batch (``y_{b-1}`` for the first), which needs batches taken in order and
  of more than one example. That pairing is the trainer's: ``mismatched(rows)``
  builds those sequences for the rows of one batch.

  Example:
    >>> import numpy as np
    >>> from jlora.data import TokenizedUnpaired
    >>> z = np.zeros((2, 4), np.int32)
    >>> t = TokenizedUnpaired(ids=z, attention_mask=z, completion_mask=z, label=np.array([True, False]),
    ...                       prompt_ids=z, prompt_lens=np.array([1, 1]), completion_ids=z,
    ...                       completion_lens=np.array([2, 1]), where=("a", "b"))
    >>> t.mismatched(np.array([0, 1]))["completion_mask"].tolist()
    [[0, 1, 0, 0], [0, 1, 1, 0]]
  """

  ids: np.ndarray  # (n, max_len) int32: prompt + completion, cut to max_len
  attention_mask: np.ndarray  # (n, max_len) int32
  completion_mask: np.ndarray  # (n, max_len) int32: 1 on the completion's tokens
  label: np.ndarray  # (n,) bool: True = desirable
  prompt_ids: np.ndarray  # (n, max_len) int32: the prompt alone, right-padded (shorter than max_len)
  prompt_lens: np.ndarray  # (n,) int32
  completion_ids: np.ndarray  # (n, max_len) int32: the completion alone, its first max_len tokens
  completion_lens: np.ndarray  # (n,) int32
  where: tuple[str, ...]
  pad_id: int = 0  # the id padding the rows

  def __len__(self) -> int:
    return self.ids.shape[0]

  def mismatched(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """KL sequences of one batch: the prompt of ``rows[j]`` with the completion of ``rows[j-1]``.

    Cut to ``max_len`` keeping the start, as TRL's ``DataCollatorForUnpairedPreference``.
    Returns ``ids``, ``attention_mask``, ``completion_mask``, each ``(len(rows), max_len)``.
    """
    rows = np.asarray(rows)
    width = self.ids.shape[1]
    out = {k: np.zeros((len(rows), width), np.int32) for k in ("ids", "attention_mask", "completion_mask")}
    out["ids"][:] = self.pad_id
    for j, (x, y) in enumerate(zip(rows, np.roll(rows, 1))):
      p, c = int(self.prompt_lens[x]), min(int(self.completion_lens[y]), width - int(self.prompt_lens[x]))
      out["ids"][j, :p] = self.prompt_ids[x, :p]
      out["ids"][j, p:p + c] = self.completion_ids[y, :c]
      out["attention_mask"][j, :p + c] = 1
      out["completion_mask"][j, p:p + c] = 1
    return out


@dataclasses.dataclass(frozen=True)
class PreferenceReport:
  """What ``tokenize_preference`` / ``tokenize_unpaired`` did (``lines()`` for the run log).

  Example:
    >>> from jlora.data import PreferenceReport
    >>> PreferenceReport(examples=2, truncated=1, prompt_merged=0, max_len=64).lines()
    ['data: 1 of 2 examples truncated to max_seq_len=64 (keeping the start)']
  """

  examples: int  # examples given
  truncated: int  # examples with an answer cut to max_len
  prompt_merged: int  # examples whose prompt tokens are not a prefix of prompt + answer (TRL warns)
  max_len: int
  skipped: tuple[str, ...] = ()  # "where: problem" of each example skipped (skip_bad)

  def lines(self) -> list[str]:
    """One line per noteworthy fact (nothing when everything went plainly)."""
    out = []
    if self.skipped:
      out.append(f"data: skipped {len(self.skipped)} of {self.examples} examples (the first: {self.skipped[0]})")
    if self.prompt_merged:
      out.append(f"data: in {self.prompt_merged} of {self.examples} examples the prompt's tokens are not a "
                 "prefix of prompt + answer (BPE merged across the boundary, or the template renders the "
                 "prompt differently alone); the answer starts where they diverge, as in TRL")
    if self.truncated:
      out.append(f"data: {self.truncated} of {self.examples} examples truncated to max_seq_len={self.max_len} "
                 "(keeping the start)")
    return out


def tokenize_preference(examples: Sequence[Example], tokenizer: Any, *, max_len: int, skip_bad: bool = False
                        ) -> tuple[TokenizedPreference, PreferenceReport]:
  """Tokenizes preference pairs as TRL 1.16's DPOTrainer and its collator do (see the module docstring).

  Args:
    examples: ``Example``s holding ``Preference`` records.
    tokenizer: a Hugging Face tokenizer (with a chat template for conversational records).
    max_len: the sequence length (``--max-seq-len``); each of prompt + chosen and
      prompt + rejected is cut to it.
    skip_bad: skip (and report) an example whose prompt fills ``max_len``, or that
      the template refuses, instead of raising.

  Returns:
    The arrays, and a report.

  Raises:
    DataError: naming the example's ``where`` and the fix.

  Example:
    >>> from transformers import AutoTokenizer
    >>> from jlora.data import Example, Preference, tokenize_preference
    >>> import jlora, os
    >>> tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(jlora.__file__), "assets", "tiny-base"))
    >>> data, _ = tokenize_preference([Example("d.jsonl:1", Preference("2+2=", "4", "5"))], tok, max_len=8)
    >>> data.chosen_ids[0].tolist(), data.chosen_completion_mask[0].tolist()
    ([18, 11, 18, 29, 20, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0])
  """
  _check_args(examples, Preference, max_len)
  tokenized, skipped, merged = _tokenize_each(examples, tokenizer, max_len, skip_bad,
                                              lambda r: (r.chosen, r.rejected))
  kept = [(ex.where, prompt, chosen, rejected) for ex, prompt, (chosen, rejected) in tokenized]
  pad = _pad(tokenizer)
  c = _rows([(p, a) for _, p, a, _ in kept], max_len, pad)
  r = _rows([(p, a) for _, p, _, a in kept], max_len, pad)
  truncated = sum(len(p) + max(len(a), len(b)) > max_len for _, p, a, b in kept)
  data = TokenizedPreference(chosen_ids=c[0], chosen_attention_mask=c[1], chosen_completion_mask=c[2],
                             rejected_ids=r[0], rejected_attention_mask=r[1], rejected_completion_mask=r[2],
                             where=tuple(w for w, *_ in kept))
  return data, PreferenceReport(examples=len(examples), truncated=truncated, prompt_merged=merged, max_len=max_len,
                                skipped=tuple(skipped))


def tokenize_unpaired(examples: Sequence[Example], tokenizer: Any, *, max_len: int, skip_bad: bool = False
                      ) -> tuple[TokenizedUnpaired, PreferenceReport]:
  """Tokenizes labelled examples as TRL 1.16's KTOTrainer and its collator do (see the module docstring).

  Preference pairs are unpaired first (``unpair``). The KL term's mismatched
  pairs are left to the trainer (``TokenizedUnpaired.mismatched``).

  Args:
    examples: ``Example``s holding ``Unpaired`` (or ``Preference``) records.
    tokenizer: a Hugging Face tokenizer (with a chat template for conversational records).
    max_len: the sequence length (``--max-seq-len``).
    skip_bad: skip (and report) an example whose prompt fills ``max_len``, or that
      the template refuses, instead of raising.

  Returns:
    The arrays, and a report.

  Raises:
    DataError: naming the example's ``where`` and the fix.

  Example:
    >>> from transformers import AutoTokenizer
    >>> from jlora.data import Example, Unpaired, tokenize_unpaired
    >>> import jlora, os
    >>> tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(jlora.__file__), "assets", "tiny-base"))
    >>> data, _ = tokenize_unpaired([Example("d.jsonl:1", Unpaired("2+2=", "4", True))], tok, max_len=8)
    >>> data.completion_mask[0].tolist(), data.label.tolist()
    ([0, 0, 0, 0, 1, 1, 0, 0], [True])
  """
  examples = unpair(examples)
  _check_args(examples, Unpaired, max_len)
  tokenized, skipped, merged = _tokenize_each(examples, tokenizer, max_len, skip_bad, lambda r: (r.completion,))
  kept = [(ex.where, prompt, completion, ex.record.label) for ex, prompt, (completion,) in tokenized]
  pad = _pad(tokenizer)
  ids, am, cm = _rows([(p, c) for _, p, c, _ in kept], max_len, pad)
  n = len(kept)
  prompt_ids = np.full((n, max_len), pad, np.int32)
  completion_ids = np.full((n, max_len), pad, np.int32)
  for i, (_, p, c, _) in enumerate(kept):
    prompt_ids[i, :len(p)] = p
    completion_ids[i, :min(len(c), max_len)] = c[:max_len]
  data = TokenizedUnpaired(
      ids=ids, attention_mask=am, completion_mask=cm, label=np.array([k[3] for k in kept], bool),
      prompt_ids=prompt_ids, prompt_lens=np.array([len(k[1]) for k in kept], np.int32),
      completion_ids=completion_ids, completion_lens=np.array([min(len(k[2]), max_len) for k in kept], np.int32),
      where=tuple(k[0] for k in kept), pad_id=pad)
  truncated = sum(len(p) + len(c) > max_len for _, p, c, _ in kept)
  return data, PreferenceReport(examples=len(examples), truncated=truncated, prompt_merged=merged, max_len=max_len,
                                skipped=tuple(skipped))


def _tokenize_each(examples: Sequence[Example], tokenizer: Any, max_len: int, skip_bad: bool,
                   answers: Callable[[Any], tuple[Any, ...]]) -> tuple[list, list[str], int]:
  """``[(example, prompt ids, answers' ids)]`` of the examples that tokenize with room for an answer,
  the problems of those skipped (``skip_bad``; else the first raises), and how many had their prompt
  merged into an answer. ``answers(record)``: the record's answers, each tokenized after the prompt."""
  kept, skipped, merged = [], [], 0
  for ex in examples:
    try:
      prompt, tokenized, m = _tokenize(tokenizer, ex, ex.record.prompt, answers(ex.record))
      _check_room(ex.where, len(prompt), max_len)
    except DataError as e:
      if not skip_bad:
        raise
      skipped.append(str(e))
      continue
    merged += m
    kept.append((ex, prompt, tokenized))
  _check_left(kept, skipped, examples)
  return kept, skipped, merged


def _check_args(examples: Sequence[Example], kind: type, max_len: int) -> None:
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  bad = {type(ex.record).__name__ for ex in examples if not isinstance(ex.record, kind)}
  if bad:
    raise ValueError(f"expected {kind.__name__} records, got {sorted(bad)}")


def _check_room(where: str, prompt_len: int, max_len: int) -> None:
  if prompt_len >= max_len:
    raise DataError(f"{where}: the prompt ({prompt_len} tokens) leaves no room for the answer within "
                    f"--max-seq-len {max_len}; raise --max-seq-len, shorten the prompt, or pass --skip-bad-lines "
                    "to skip such examples")


def _check_left(kept: list, skipped: list[str], examples: Sequence[Example]) -> None:
  if not kept:
    raise DataError(f"no usable examples: all {len(examples)} were skipped (the first: {skipped[0]})" if skipped
                    else "no examples to tokenize")


def _pad(tokenizer: Any) -> int:
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _tokenize(tokenizer: Any, ex: Example, prompt: Any, answers: tuple[Any, ...]
              ) -> tuple[list[int], list[list[int]], bool]:
  """``(prompt_ids, [answer_ids...], merged)`` by TRL's common-prefix rule."""
  r = ex.record
  if isinstance(prompt, str):
    eos = tokenizer.eos_token
    if eos is None:
      raise DataError(f"{ex.where}: string answers end with the EOS token, and the tokenizer has none; give a "
                      "tokenizer with an eos_token")
    answers = tuple(a if a.endswith(eos) else a + eos for a in answers)
    prompt_ids = list(tokenizer(text=prompt)["input_ids"])
    fulls = [list(tokenizer(text=prompt + a)["input_ids"]) for a in answers]
  else:
    if not getattr(tokenizer, "chat_template", None):
      raise DataError(f"{ex.where}: a conversational record needs the tokenizer's chat template, and "
                      f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')} has none; give a tokenizer with "
                      "one, or use string records")
    msgs = [m.as_dict() for m in prompt]
    try:
      prompt_ids = chat_ids(tokenizer, msgs, generation_prompt=True, tools=r.tools, kwargs=r.template_kwargs)
      fulls = [chat_ids(tokenizer, msgs + [m.as_dict() for m in a], generation_prompt=False, tools=r.tools,
                        kwargs=r.template_kwargs) for a in answers]
    except TemplateFailure as e:
      raise DataError(f"{ex.where}: {template_name(tokenizer)} refuses the conversation ({e}); fix the roles or "
                      "their order, or pass --skip-bad-lines") from None
  n = min(common_prefix_length(prompt_ids, f) for f in fulls)
  return prompt_ids[:n], [f[n:] for f in fulls], n < len(prompt_ids)


def _rows(pairs: list[tuple[list[int], list[int]]], max_len: int, pad: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(ids, attention_mask, completion_mask)`` of ``prompt + answer`` rows cut to ``max_len``, right-padded."""
  n = len(pairs)
  ids = np.full((n, max_len), pad, np.int32)
  am = np.zeros((n, max_len), np.int32)
  cm = np.zeros((n, max_len), np.int32)
  for i, (p, a) in enumerate(pairs):
    seq = (p + a)[:max_len]
    ids[i, :len(seq)] = seq
    am[i, :len(seq)] = 1
    cm[i, len(p):len(seq)] = 1
  return ids, am, cm
