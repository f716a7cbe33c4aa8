"""Supervised examples as token arrays: ids, the trained tokens, truncation and packing.

``Prompted`` records keep the semantics of ``jlora.finetune.data.tokenize``: the
prompt and the completion are tokenized apart (no special tokens) and an EOS id
is appended; the prompt is masked, the completion and the EOS trained; an
example too long for ``max_len`` loses prompt tokens from the left first (one is
kept), then tokens from its end. ``chat_template=True`` wraps the prompt as one
user turn of the tokenizer's chat template, with the generation prompt.

``Chat`` records render with the tokenizer's chat template and train their
assistant turns (``jlora.data._chat``); one that is too long keeps its start.

Packing concatenates every sequence, cuts rows of ``max_len`` (the tail that
does not fill a row is dropped) and gives each sequence a segment id, so that the
model keeps attention within a sequence; a sequence cut by a row boundary
continues in the next row as its own segment. The first token of a segment is
never trained (it cannot be predicted from the token before it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from jlora.data._chat import EMPTY_REASONING, chat_sequences
from jlora.data._errors import DataError
from jlora.data._records import Chat, Example, Prompted
from jlora.data._render import TemplateFailure, chat_ids, has_chat_template, require_fast, template_name

TrainOn = Literal["all", "last"]


@dataclasses.dataclass(frozen=True)
class TokenizedSFT:
  """Supervised data as arrays, one row per sequence (or per packed row).

  The loss at position ``t`` predicts ``ids[:, t]`` from the tokens before it, and
  counts where ``loss_mask[:, t]`` is 1 (position 0 is never predicted).

  Example:
    >>> import numpy as np
    >>> from jlora.data import TokenizedSFT
    >>> t = TokenizedSFT(ids=np.zeros((1, 4), np.int32), loss_mask=np.zeros((1, 4), np.float32),
    ...                  attention_mask=np.ones((1, 4), np.int32), where=("d.jsonl:1",))
    >>> len(t), t.row_where(0)
    (1, ('d.jsonl:1',))
  """

  ids: np.ndarray  # (n, max_len) int32, right-padded with the pad id
  loss_mask: np.ndarray  # (n, max_len) float32: 1 where the token is predicted and trained on
  attention_mask: np.ndarray  # (n, max_len) int32
  where: tuple[str, ...]  # per sequence: its example's "file:line" (and turn, for a split conversation)
  truncated: int = 0  # examples that had to be truncated
  # (n, max_len) int32 segment ids of packed rows, sequence k having id k + 1; None when unpacked.
  segment_ids: np.ndarray | None = None

  def __len__(self) -> int:
    return self.ids.shape[0]

  def row_where(self, row: int) -> tuple[str, ...]:
    """The ``where`` of each sequence in ``row`` (one unless packed)."""
    if self.segment_ids is None:
      return (self.where[row],)
    segs = [int(s) for s in np.unique(self.segment_ids[row])]
    return tuple(self.where[s - 1] for s in segs)


@dataclasses.dataclass(frozen=True)
class SFTReport:
  """What ``tokenize_sft`` did, for the run log (``lines()``).

  Example:
    >>> from jlora.data import SFTReport
    >>> SFTReport(examples=3, sequences=4, split=1, truncated=0, trained_tokens=20, max_len=64).lines()
    ['data: 1 of 3 conversations trained as several sequences (the chat template rewrites earlier turns)']
  """

  examples: int  # examples given
  sequences: int  # token sequences made (before packing); a split conversation makes several
  split: int  # conversations trained as several sequences (history-rewriting templates; see _chat)
  truncated: int  # examples cut to max_len
  trained_tokens: int  # tokens trained, over all sequences (before packing)
  max_len: int
  skipped: tuple[str, ...] = ()  # "where: problem" of each example skipped (skip_bad)

  def lines(self) -> list[str]:
    """One line per noteworthy fact (nothing when everything went plainly)."""
    out = []
    if self.skipped:
      out.append(f"data: skipped {len(self.skipped)} of {self.examples} examples (the first: {self.skipped[0]})")
    if self.split:
      out.append(f"data: {self.split} of {self.examples} conversations trained as several sequences (the chat "
                 "template rewrites earlier turns)")
    if self.truncated:
      out.append(f"data: {self.truncated} of {self.examples} examples truncated to max_seq_len={self.max_len}")
    return out


def tokenize_sft(examples: Sequence[Example], tokenizer: Any, *, max_len: int, pack: bool = False,
                 chat_template: bool | None = None, train_on: TrainOn = "all",
                 empty_reasoning: str | None = EMPTY_REASONING, skip_bad: bool = False
                 ) -> tuple[TokenizedSFT, SFTReport]:
  """Tokenizes supervised examples, marks the trained tokens, truncates or packs, and pads.

  Args:
    examples: ``Example``s holding ``Chat`` or ``Prompted`` records.
    tokenizer: a Hugging Face tokenizer (a fast one for ``Chat`` records).
    max_len: the sequence length (``--max-seq-len``).
    pack: concatenate the sequences into full rows with segment ids (no truncation).
    chat_template: ``None``: ``Chat`` records use the chat template, ``Prompted``
      ones do not; ``True``: ``Prompted`` prompts too, as one user turn
      (``--chat-template``); ``False``: no chat template (a ``Chat`` record is an error).
    train_on: ``"all"`` assistant turns of a conversation, or the ``"last"`` one.
    empty_reasoning: a regex matched at the start of each assistant span; what it
      matches is not trained (an empty reasoning block). None to train it.
    skip_bad: skip (and report) an example that trains no token after truncation,
      or that the template refuses, instead of raising.

  Returns:
    The arrays, and a report of what was split, truncated and skipped.

  Raises:
    DataError: naming the example's ``where`` and the fix (see ``skip_bad``), or
      a tokenizer without the chat template or EOS that the records need.

  Example:
    >>> from transformers import AutoTokenizer
    >>> from jlora.data import Example, Prompted, tokenize_sft
    >>> import jlora, os
    >>> tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(jlora.__file__), "assets", "tiny-base"))
    >>> data, report = tokenize_sft([Example("d.jsonl:1", Prompted("2+2=", "4"))], tok, max_len=8)
    >>> data.ids[0].tolist(), data.loss_mask[0].tolist()
    ([18, 11, 18, 29, 20, 0, 0, 0], [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
  """
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  if train_on not in ("all", "last"):
    raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
  _check_tokenizer(examples, tokenizer, chat_template)
  rows: list[list[int]] = []
  masks: list[list[int]] = []
  wheres: list[str] = []
  skipped: list[str] = []
  split = truncated = 0
  for ex in examples:
    try:
      seqs, cut = [], False
      for where, ids, mask in _sequences(ex, tokenizer, chat_template=chat_template, train_on=train_on,
                                         empty_reasoning=empty_reasoning):
        first = mask.index(1) if 1 in mask else len(mask)
        if not pack and len(ids) > max_len:
          ids, mask = _truncate(ex.record, ids, mask, max_len)
          cut = True
        _check_trained(where, mask, first, None if pack else max_len)
        seqs.append((where, ids, mask))
    except DataError as e:
      if not skip_bad:
        raise
      skipped.append(str(e))
      continue
    split += len(seqs) > 1
    truncated += cut
    for where, ids, mask in seqs:
      rows.append(ids)
      masks.append(mask)
      wheres.append(where)
  if not rows:
    raise DataError(f"no usable examples: all {len(examples)} were skipped (the first: {skipped[0]})" if skipped
                    else "no examples to tokenize")
  report = SFTReport(examples=len(examples), sequences=len(rows), split=split, truncated=truncated,
                     trained_tokens=sum(sum(m[1:]) for m in masks), max_len=max_len, skipped=tuple(skipped))
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  return _arrays(rows, masks, tuple(wheres), max_len=max_len, pack=pack, pad=pad, truncated=truncated), report


def _check_tokenizer(examples: Sequence[Example], tokenizer: Any, chat_template: bool | None) -> None:
  kinds = {type(ex.record) for ex in examples}
  bad = kinds - {Chat, Prompted}
  if bad:
    raise ValueError(f"tokenize_sft takes Chat and Prompted records, got {sorted(k.__name__ for k in bad)}")
  if Chat in kinds:
    first = next(ex.where for ex in examples if isinstance(ex.record, Chat))
    if chat_template is False:
      raise DataError(f"{first}: a conversation needs the chat template; drop --no-chat-template")
    if not has_chat_template(tokenizer):
      raise DataError(f"{first}: a conversation needs the tokenizer's chat template, and "
                      f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')} has none; give a model whose "
                      "tokenizer has one (chat_template in tokenizer_config.json, or chat_template.jinja), "
                      "or use prompt/completion records")
    require_fast(tokenizer)
  if Prompted in kinds:
    if chat_template and not has_chat_template(tokenizer):
      raise DataError("--chat-template: this model's tokenizer has no chat template; drop --chat-template")
    if tokenizer.eos_token_id is None:
      raise DataError("prompt/completion records end with the EOS token, and the tokenizer has none "
                      "(eos_token_id is None); give a tokenizer with an eos_token")


def _sequences(ex: Example, tokenizer: Any, *, chat_template: bool | None, train_on: TrainOn,
               empty_reasoning: str | None) -> list[tuple[str, list[int], list[int]]]:
  r = ex.record
  if isinstance(r, Prompted):
    ids, mask = encode_prompted(tokenizer, r, chat_template=bool(chat_template))
    return [(ex.where, ids, mask)]
  seqs = chat_sequences(r, tokenizer, where=ex.where, train_on=train_on, empty_reasoning=empty_reasoning)
  if len(seqs) == 1:
    return [(ex.where, seqs[0].ids, seqs[0].mask)]
  return [(f"{ex.where} (turns {', '.join(map(str, s.turns))})", s.ids, s.mask) for s in seqs]


def encode_prompted(tokenizer: Any, record: Prompted, *, chat_template: bool) -> tuple[list[int], list[int]]:
  """Token ids of a prompt/completion record and its loss mask (1 on the completion and the final EOS).

  Example:
    >>> from transformers import AutoTokenizer
    >>> from jlora.data import Prompted, encode_prompted
    >>> import jlora, os
    >>> tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(jlora.__file__), "assets", "tiny-base"))
    >>> encode_prompted(tok, Prompted("2+2=", "4"), chat_template=False)
    ([18, 11, 18, 29, 20, 0], [0, 0, 0, 0, 1, 1])
  """
  if chat_template:
    prompt_ids = chat_prompt_ids(tokenizer, record.prompt)
  else:
    prompt_ids = tokenizer(record.prompt, add_special_tokens=False)["input_ids"] if record.prompt else []
  completion_ids = tokenizer(record.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
  return list(prompt_ids) + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def eval_prompt(record: Chat | Prompted, tokenizer: Any, *, chat_template: bool | None = None
                ) -> tuple[list[int], str]:
  """What a model is given to answer a record, and the reference answer (exact-match evaluation).

  ``Prompted``: the prompt's ids as training tokenizes them (wrapped as a user turn
  with ``chat_template=True``) and the completion. ``Chat``: the conversation
  before its last assistant turn through the chat template with the generation
  prompt, as ``apply_chat_template`` tokenizes it for inference, and that turn's
  content (its text parts joined).

  Raises:
    DataError: a template that refuses the conversation (naming no file: the caller
      knows the record's ``where``).

  Example:
    >>> from transformers import AutoTokenizer
    >>> from jlora.data import Prompted, eval_prompt
    >>> import jlora, os
    >>> tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(jlora.__file__), "assets", "tiny-base"))
    >>> eval_prompt(Prompted("2+2=", "4"), tok)
    ([18, 11, 18, 29], '4')
  """
  if isinstance(record, Prompted):
    ids, mask = encode_prompted(tokenizer, record, chat_template=bool(chat_template))
    return ids[:mask.index(1)], record.completion
  last = max(i for i, m in enumerate(record.messages) if m.role == "assistant")
  msgs = [m.as_dict() for m in record.messages[:last]]
  try:
    ids = chat_ids(tokenizer, msgs, generation_prompt=True, tools=record.tools, kwargs=record.template_kwargs)
  except TemplateFailure as e:
    raise DataError(f"{template_name(tokenizer)} refuses the conversation before its last answer ({e})") from None
  content = record.messages[last].content
  if isinstance(content, list):
    content = "".join(part["text"] for part in content)
  return ids, content or ""


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
  """``prompt`` as one user turn in the tokenizer's chat template, ready for the assistant's answer.

  Works with transformers 4.57 and 5.x (whose ``apply_chat_template(tokenize=True)``
  returns a ``BatchEncoding``): the ids are read from the returned mapping.

  Raises:
    DataError: the tokenizer has no chat template, or jinja2 (which renders templates) is missing.

  Example:
    >>> from transformers import AutoTokenizer
    >>> from jlora.data import chat_prompt_ids
    >>> import jlora, os
    >>> tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(jlora.__file__), "assets", "tiny-base"))
    >>> tok.chat_template = "{% for m in messages %}Q: {{ m.content }}\\n{% endfor %}A:"
    >>> tok.decode(chat_prompt_ids(tok, "2+2?"))
    'Q: 2+2?\\nA:'
  """
  if not has_chat_template(tokenizer):
    raise DataError("--chat-template: this model's tokenizer has no chat template; drop --chat-template")
  try:
    out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)
  except ImportError as e:  # transformers renders templates with jinja2 (jlora's [hf] extra installs it)
    raise DataError(f"--chat-template: {e}; install it with: pip install jinja2") from None
  return [int(i) for i in out["input_ids"]]


def _truncate(record: Any, ids: list[int], mask: list[int], max_len: int) -> tuple[list[int], list[int]]:
  if isinstance(record, Prompted):  # the prompt from the left first (keeping one token), then the end
    n_prompt = mask.index(1)
    drop = min(len(ids) - max_len, max(n_prompt - 1, 0))
    ids, mask = ids[drop:], mask[drop:]
  return ids[:max_len], mask[:max_len]


def _check_trained(where: str, mask: list[int], first: int, max_len: int | None) -> None:
  """Refuses a sequence that trains nothing after truncation to ``max_len`` (position 0 is never
  predicted); ``first`` is the position of its first trained token before truncation."""
  if any(mask[1:]):
    return
  if max_len is None:
    raise DataError(f"{where}: no token is trained; give the example an answer")
  if first >= max_len:
    raise DataError(f"{where}: the prompt ({first} tokens before the answer) leaves no room for the answer "
                    f"within --max-seq-len {max_len}; raise --max-seq-len, shorten the prompt, or pass "
                    "--skip-bad-lines to skip such examples")
  raise DataError(f"{where}: no token is trained within --max-seq-len {max_len} (truncation cut the answer); "
                  "raise --max-seq-len, or pass --skip-bad-lines to skip such examples")


def _arrays(rows: list[list[int]], masks: list[list[int]], where: tuple[str, ...], *, max_len: int, pack: bool,
            pad: int, truncated: int) -> TokenizedSFT:
  if pack:
    flat_ids = [t for r in rows for t in r]
    flat_mask = [m for r in masks for m in r]
    flat_seg = [i + 1 for i, r in enumerate(rows) for _ in r]
    n = len(flat_ids) // max_len
    if n == 0:
      raise DataError(f"--pack: the data holds {len(flat_ids)} tokens, fewer than --max-seq-len {max_len}; "
                      "lower --max-seq-len or add data")
    ids = np.asarray(flat_ids[: n * max_len], np.int32).reshape(n, max_len)
    lm = np.asarray(flat_mask[: n * max_len], np.float32).reshape(n, max_len)
    seg = np.asarray(flat_seg[: n * max_len], np.int32).reshape(n, max_len)
    # The first token of an example cannot be predicted from the one before it (another example).
    lm[:, 1:] *= seg[:, 1:] == seg[:, :-1]
    return TokenizedSFT(ids=ids, loss_mask=lm, attention_mask=np.ones_like(ids), where=where, truncated=0,
                        segment_ids=seg)
  ids = np.full((len(rows), max_len), pad, np.int32)
  lm = np.zeros((len(rows), max_len), np.float32)
  am = np.zeros((len(rows), max_len), np.int32)
  for i, (r, m) in enumerate(zip(rows, masks)):
    ids[i, : len(r)] = r
    lm[i, : len(m)] = m
    am[i, : len(r)] = 1
  return TokenizedSFT(ids=ids, loss_mask=lm, attention_mask=am, where=where, truncated=truncated)
