"""Supervised fine-tuning: next-token cross-entropy on the completion's tokens, the prompt's masked out."""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora.finetune import data as data_lib
from jlora.finetune.cli import UserError
from jlora.finetune.tasks.base import Params, Task, TaskContext


class SFT(Task):
  """Prompt/completion records (``jlora.finetune.data``), the loss on the completion and its EOS.

  Held-out metrics: ``eval_loss`` (mean token cross-entropy of the completions) and, by
  generation, ``exact_match`` (greedy completion equal to the reference, whitespace-stripped).
  """

  name = "sft"

  def prepare(self, ctx: TaskContext) -> None:
    o, say = self.data_options, ctx.say
    self.ctx = ctx
    self._wrapped = jlora.wrap(ctx.loaded.forward)
    check_max_seq_len(o.max_seq_len, ctx.loaded)
    records, skipped = data_lib.load_records(o.data_path, skip_bad_lines=o.skip_bad_lines)
    if o.eval_path:
      eval_records, _ = data_lib.load_records(o.eval_path, skip_bad_lines=o.skip_bad_lines, option="--eval-data")
    else:
      order = np.random.default_rng(self.batch_options.seed).permutation(len(records))
      n_eval = max(1, int(len(records) * o.eval_fraction))
      eval_records = [records[i] for i in order[:n_eval]]
      records = [records[i] for i in order[n_eval:]]
    if skipped:
      say(f"data: skipped {skipped} malformed lines of {o.data_path}")
    tok = ctx.tokenizer
    self.train = data_lib.tokenize(records, tok, max_len=o.max_seq_len, pack=o.pack, chat_template=o.chat_template)
    self.eval = data_lib.tokenize(eval_records, tok, max_len=o.max_seq_len, chat_template=o.chat_template)
    if self.train.truncated:
      say(f"data: {self.train.truncated} of {len(records)} training examples truncated to "
          f"max_seq_len={o.max_seq_len} (the prompt first, from the left)")
    if self.eval.truncated:
      say(f"data: {self.eval.truncated} of {len(eval_records)} eval examples truncated to "
          f"max_seq_len={o.max_seq_len} (the prompt first, from the left), as in training")
    b = self.batch_options
    self.batches = data_lib.Batches(self.train, batch_size=b.batch_size, grad_accum=b.grad_accum, seed=b.seed,
                                    process_index=ctx.process_index, process_count=ctx.process_count)
    n_em = len(eval_records) if self.eval_options.eval_exact_match == 0 else max(self.eval_options.eval_exact_match, 0)
    self.em_records = eval_records[:n_em]
    self.n_train = len(records)
    self._eval_batch = jax.jit(lambda params, mb: self.loss(params, mb, None)[:2])

  @property
  def steps_per_epoch(self) -> int:
    return self.batches.steps_per_epoch

  def batch(self, step: int) -> dict[str, np.ndarray]:
    return self.batches.get(step)

  def loss(self, params: Params, batch: dict[str, jax.Array], key: jax.Array | None
           ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    logits = self._wrapped(params, batch["ids"], batch["attention_mask"], batch.get("segment_ids"), lora_rng=key)
    logits = logits[:, :-1].astype(jnp.float32)
    mask = batch["loss_mask"][:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["ids"][:, 1:])
    return jnp.sum(ce * mask), jnp.sum(mask), {}

  def evaluate(self, params: Params) -> dict[str, float]:
    data, size = self.eval, self.batch_options.batch_size
    total = count = 0.0
    for s in range(0, len(data), size):
      sl = slice(s, s + size)
      mb = {"ids": data.ids[sl], "loss_mask": data.loss_mask[sl], "attention_mask": data.attention_mask[sl]}
      short = size - mb["ids"].shape[0]
      if short:  # pad with rows that carry no loss, to keep one compiled shape
        mb = {k: np.concatenate([v, np.zeros((short, v.shape[1]), v.dtype)]) for k, v in mb.items()}
      l, n = self._eval_batch(params, mb)
      total += float(l)
      count += float(n)
    return {"eval_loss": total / max(count, 1.0)}

  def generation_eval(self, params: Params) -> tuple[dict[str, float], list[dict]]:
    if not self.em_records:
      return {}, []
    em, rows = exact_match(self.ctx.loaded, params, self.em_records, chat_template=self.data_options.chat_template,
                           max_new_tokens=self.eval_options.max_new_tokens,
                           max_prompt_len=self.data_options.max_seq_len)
    return {"exact_match": em}, rows

  def describe(self) -> dict[str, Any]:
    return {"task": self.name, "data": self.data_options.data_path, "train_examples": self.n_train,
            "train_sequences": len(self.train), "eval_sequences": len(self.eval)}

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for a in (self.train.ids, self.train.loss_mask, self.train.attention_mask, self.train.segment_ids):
      if a is not None:
        h.update(np.ascontiguousarray(a).tobytes())
        h.update(str(a.shape).encode())
    return h.hexdigest()[:16]


def check_max_seq_len(max_seq_len: int, loaded: Any) -> None:
  """Refuses a ``--max-seq-len`` past the positions the model was trained for.

  Raises:
    jlora.finetune.cli.UserError: naming both lengths and the fix.
  """
  limit = loaded.max_positions
  if limit and max_seq_len > limit:
    raise UserError(f"--max-seq-len {max_seq_len} exceeds {loaded.model_id}'s {limit} positions "
                             f"(max_position_embeddings in its config.json); use --max-seq-len {limit} or less")


def exact_match(loaded, params, records: list[data_lib.Record], *, chat_template: bool, max_new_tokens: int,
                max_prompt_len: int | None = None) -> tuple[float, list[dict]]:
  """Share of records whose greedy completion equals the reference (whitespace-stripped).

  ``max_prompt_len``: prompts longer than this keep their last tokens (as training keeps the
  end of a truncated prompt), and never more than the model's positions leave room for.
  """
  tok = loaded.tokenizer
  room = loaded.max_positions - max_new_tokens if loaded.max_positions else None
  limits = [n for n in (max_prompt_len, room) if n is not None]
  limit = max(1, min(limits)) if limits else None
  prompts = []
  for r in records:
    ids, mask = data_lib.encode(tok, r, chat_template=chat_template)
    p = ids[: mask.index(1)]
    prompts.append(p[-limit:] if limit and len(p) > limit else p)
  outs = loaded.generate(params, prompts, max_new_tokens=max_new_tokens)
  rows = []
  for r, o in zip(records, outs):
    text = tok.decode(o, skip_special_tokens=True)
    rows.append({"prompt": r.prompt, "target": r.completion, "output": text,
                 "match": text.strip() == r.completion.strip()})
  return float(np.mean([row["match"] for row in rows])), rows
