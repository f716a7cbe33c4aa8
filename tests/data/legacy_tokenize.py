"""The prompt/completion tokenization jlora.finetune.data had before jlora.data replaced it, kept as the
oracle of ``test_prompted_records_tokenize_as_before`` (the bundled task's numbers depend on it)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Record:
  prompt: str
  completion: str


def load_records(path: str) -> list[Record]:
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        obj = json.loads(line)
        out.append(Record(obj["prompt"], obj["completion"]))
  return out


@dataclasses.dataclass
class Tokenized:
  ids: np.ndarray  # (n, max_len) int32, right-padded
  loss_mask: np.ndarray  # (n, max_len) float32: 1 where the token is predicted and trained on
  attention_mask: np.ndarray  # (n, max_len) int32
  truncated: int  # examples that had to be truncated
  # (n, max_len) int32 example ids of packed rows (attention stays within an example); None unpacked.
  segment_ids: np.ndarray | None = None

  def __len__(self) -> int:
    return self.ids.shape[0]


def encode(tokenizer, record: Record, *, chat_template: bool) -> tuple[list[int], list[int]]:
  """Token ids of one record and its loss mask (1 on completion tokens and the final EOS)."""
  if chat_template:
    out = tokenizer.apply_chat_template([{"role": "user", "content": record.prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)
    prompt_ids = [int(i) for i in out["input_ids"]]
  else:
    prompt_ids = tokenizer(record.prompt, add_special_tokens=False)["input_ids"] if record.prompt else []
  completion_ids = tokenizer(record.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
  return list(prompt_ids) + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def tokenize(records: Sequence[Record], tokenizer, *, max_len: int, pack: bool = False,
             chat_template: bool = False) -> Tokenized:
  """Tokenises, truncates (prompt from the left, then the end) or packs, and pads.

  Packed rows carry ``segment_ids`` (one id per example; an example cut by a row
  boundary continues in the next row as its own segment), so that the model keeps
  attention within each example and restarts positions at its first token.
  """
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  rows, masks, truncated = [], [], 0
  for rec in records:
    ids, mask = encode(tokenizer, rec, chat_template=chat_template)
    if len(ids) > max_len and not pack:
      truncated += 1
      n_prompt = mask.index(1)
      drop = min(len(ids) - max_len, max(n_prompt - 1, 0))
      ids, mask = ids[drop:], mask[drop:]
      ids, mask = ids[:max_len], mask[:max_len]
    rows.append(ids)
    masks.append(mask)
  if pack:
    flat_ids = [t for r in rows for t in r]
    flat_mask = [m for r in masks for m in r]
    flat_seg = [i + 1 for i, r in enumerate(rows) for _ in r]
    n = len(flat_ids) // max_len
    if n == 0:
      raise ValueError(f"--pack: the data holds {len(flat_ids)} tokens, fewer than --max-seq-len {max_len}; "
                      "lower --max-seq-len or add data")
    ids = np.asarray(flat_ids[: n * max_len], np.int32).reshape(n, max_len)
    lm = np.asarray(flat_mask[: n * max_len], np.float32).reshape(n, max_len)
    seg = np.asarray(flat_seg[: n * max_len], np.int32).reshape(n, max_len)
    # The first token of an example cannot be predicted from the one before it (another example).
    lm[:, 1:] *= seg[:, 1:] == seg[:, :-1]
    return Tokenized(ids, lm, np.ones_like(ids), 0, seg)
  ids = np.full((len(rows), max_len), pad, np.int32)
  lm = np.zeros((len(rows), max_len), np.float32)
  am = np.zeros((len(rows), max_len), np.int32)
  for i, (r, m) in enumerate(zip(rows, masks)):
    ids[i, : len(r)] = r
    lm[i, : len(m)] = m
    am[i, : len(r)] = 1
  return Tokenized(ids, lm, am, truncated)
