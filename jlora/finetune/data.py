"""Training data: JSONL / text records, tokenisation with prompt masking, batches."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jlora.finetune.cli import UserError

# Accepted (prompt, completion) key pairs, in order of preference.
KEY_PAIRS = (("prompt", "completion"), ("input", "target"), ("instruction", "output"))


class DataError(UserError):
  """A missing or malformed data file or line (the message names the file and line, and the fix)."""


@dataclasses.dataclass(frozen=True)
class Record:
  prompt: str  # not trained on (masked out of the loss); empty for plain text
  completion: str  # trained on


def _record_from_obj(obj: Any) -> Record:
  if not isinstance(obj, dict):
    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
  if "instruction" in obj and "output" in obj:
    prompt = obj["instruction"]
    if obj.get("input"):
      prompt = f"{prompt}\n{obj['input']}"
    rec = (prompt, obj["output"])
  else:
    rec = None
    for pk, ck in KEY_PAIRS:
      if pk in obj and ck in obj:
        rec = (obj[pk], obj[ck])
        break
    if rec is None and "text" in obj:
      rec = ("", obj["text"])
  if rec is None:
    raise ValueError(
        f"no known fields (have {sorted(obj)}); use prompt/completion, input/target, "
        "instruction/output or text")
  if not all(isinstance(x, str) for x in rec):
    raise ValueError("prompt and completion must be strings")
  if not rec[1]:
    raise ValueError("empty completion")
  return Record(*rec)


def load_records(path: str, *, skip_bad_lines: bool = False, option: str = "--data") -> tuple[list[Record], int]:
  """Reads ``path`` (``.jsonl`` or plain text) into records; returns ``(records, skipped)``.

  Plain-text files become one trained-on record per blank-line-separated block.

  Args:
    path: the data file.
    skip_bad_lines: skip malformed JSONL lines (counted) instead of raising.
    option: the command-line option that named ``path`` (for error messages).

  Raises:
    DataError: a missing or empty file, or a bad JSONL line (with its line
      number) unless ``skip_bad_lines``.

  Example:
    >>> import json, os, tempfile
    >>> from jlora.finetune.data import load_records
    >>> path = os.path.join(tempfile.mkdtemp(), "d.jsonl")
    >>> _ = open(path, "w").write(json.dumps({"prompt": "2+2=", "completion": "4"}) + "\\n")
    >>> load_records(path)
    ([Record(prompt='2+2=', completion='4')], 0)
  """
  if not os.path.exists(path):
    raise DataError(f"{option} {path!r}: no such file")
  if not os.path.isfile(path):
    raise DataError(f"{option} {path!r} is not a file; give a .jsonl or .txt file")
  records, skipped = [], 0
  try:
    if not path.endswith((".jsonl", ".json")):
      with open(path, encoding="utf-8") as f:
        blocks = [b.strip() for b in f.read().split("\n\n")]
      records = [Record("", b) for b in blocks if b]
    else:
      with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            records.append(_record_from_obj(json.loads(line)))
          except (json.JSONDecodeError, ValueError) as e:
            if skip_bad_lines:
              skipped += 1
              continue
            raise DataError(f"{path}:{lineno}: {e}. Fix the line or pass --skip-bad-lines.") from None
  except UnicodeDecodeError as e:
    raise DataError(f"{option} {path}: not UTF-8 text ({e})") from None
  if not records:
    why = f"all {skipped} lines are malformed" if skipped else "the file is empty"
    raise DataError(f"{option} {path}: no usable records ({why}); give one JSON object per line with "
                    "prompt/completion, input/target, instruction/output or text (or a .txt file)")
  return records, skipped


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
    prompt_ids = chat_prompt_ids(tokenizer, record.prompt)
  else:
    prompt_ids = tokenizer(record.prompt, add_special_tokens=False)["input_ids"] if record.prompt else []
  completion_ids = tokenizer(record.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
  return list(prompt_ids) + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
  """``prompt`` as one user turn in the tokenizer's chat template, ready for the assistant's answer.

  Works with transformers 4.57 and 5.x (whose ``apply_chat_template(tokenize=True)`` returns a
  ``BatchEncoding``): the ids are read from the returned mapping.

  Raises:
    DataError: the tokenizer has no chat template, or jinja2 (which renders templates) is missing.
  """
  if not getattr(tokenizer, "chat_template", None):
    raise DataError("--chat-template: this model's tokenizer has no chat template; drop --chat-template")
  try:
    out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)
  except ImportError as e:  # transformers renders templates with jinja2 (jlora's [hf] extra installs it)
    raise DataError(f"--chat-template: {e}; install it with: pip install jinja2") from None
  return [int(i) for i in out["input_ids"]]


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
      raise DataError(f"--pack: the data holds {len(flat_ids)} tokens, fewer than --max-seq-len {max_len}; "
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


class Batches:
  """Deterministic batches: the order depends only on (seed, epoch), so any step can be
  recomputed after a restart (the data position *is* the step number)."""

  def __init__(self, data: Tokenized, *, batch_size: int, grad_accum: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    self.data = data
    self.global_batch = batch_size * grad_accum
    self.batch_size = batch_size
    self.grad_accum = grad_accum
    self.seed = seed
    self.steps_per_epoch = len(data) // self.global_batch
    if self.steps_per_epoch == 0:
      raise DataError(f"the {len(data)} training sequences are fewer than one batch (--batch-size * "
                      f"--grad-accum = {self.global_batch}); lower --batch-size or --grad-accum, or add data")
    if batch_size % process_count:
      raise DataError(f"--batch-size {batch_size} does not split over {process_count} processes; use a "
                      "multiple of the process count")
    self.process_index = process_index
    self.process_count = process_count

  def indices(self, step: int) -> np.ndarray:
    """This process's rows of step ``step``: shape ``(grad_accum, batch_size // process_count)``.

    Micro-batch ``m`` of the global batch is the same set of rows for any number
    of processes; process ``p`` holds its ``p``-th contiguous part.
    """
    epoch, i = divmod(step, self.steps_per_epoch)
    perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
    idx = perm[i * self.global_batch:(i + 1) * self.global_batch].reshape(self.grad_accum, self.batch_size)
    per = self.batch_size // self.process_count
    return idx[:, self.process_index * per:(self.process_index + 1) * per]

  def get(self, step: int) -> dict[str, np.ndarray]:
    """This process's part of step ``step``'s batch, shaped ``(grad_accum, rows, max_len)``."""
    idx = self.indices(step)
    batch = {
        "ids": self.data.ids[idx],
        "loss_mask": self.data.loss_mask[idx],
        "attention_mask": self.data.attention_mask[idx],
    }
    if self.data.segment_ids is not None:
      batch["segment_ids"] = self.data.segment_ids[idx]
    return batch
