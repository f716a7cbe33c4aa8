"""Supervised fine-tuning: next-token cross-entropy on the trained tokens (assistant turns, completions)."""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
import jlora.data
from jlora import objectives
from jlora._targets import ROUTER
from jlora.finetune.cli import UserError
from jlora.models import load_balancing_loss
from jlora.finetune.tasks.base import Params, Task, TaskContext, holdout, named_jit


class SFT(Task):
  """Supervised examples (``jlora.data``): conversations, prompt/completion, Alpaca, text; the loss on
  the assistant turns (or the completion) and their end-of-turn token.

  Held-out metrics: ``eval_loss`` (mean token cross-entropy of the trained tokens) and, by
  generation, ``exact_match`` (greedy answer equal to the reference, whitespace-stripped).
  """

  name = "sft"
  shown = ("aux_loss",)  # the load-balancing loss, when it is added (--router-aux-loss-coef)
  aux_coef = 0.0  # its weight in the training loss (``start``)

  def _read(self, option_path: str, option: str) -> tuple[list[jlora.data.Example], list[str]]:
    return jlora.data.read_sft(option_path, option=option, skip_bad=self.data_options.skip_bad_lines)

  def _tokenize(self, examples, tokenizer, *, pack: bool) -> tuple[jlora.data.TokenizedSFT, jlora.data.SFTReport]:
    o = self.data_options
    return jlora.data.tokenize_sft(examples, tokenizer, max_len=o.max_seq_len, pack=pack,
                                   chat_template=True if o.chat_template else None, train_on=o.train_on,
                                   skip_bad=o.skip_bad_lines)

  def show(self, tokenizer, index: int) -> str:
    examples, _ = self._read(self.data_options.data_path, "--data")
    if not 0 <= index < len(examples):
      raise jlora.data.DataError(f"--show-example {index}: --data holds {len(examples)} examples (0 to "
                                 f"{len(examples) - 1})")
    data, _ = self._tokenize(examples[index:index + 1], tokenizer, pack=False)
    shown = []
    for i in range(len(data)):  # a conversation the template makes several sequences of shows each
      text = jlora.data.show_example(data, i, tokenizer)
      head, _, rest = text.partition(": ")  # "example i of n: where (...)" -> this example's index in --data
      shown.append(f"example {index} of {len(examples)}"
                   + (f", sequence {i + 1} of {len(data)}" if len(data) > 1 else "") + ": " + rest)
    return "\n".join(shown)

  def prepare(self, ctx: TaskContext) -> None:
    o, say = self.data_options, ctx.say
    self.ctx = ctx
    self._wrapped = jlora.wrap(ctx.loaded.forward)
    check_max_seq_len(o.max_seq_len, ctx.loaded)
    examples, skipped = self._read(o.data_path, "--data")
    if o.eval_path:
      eval_examples, _ = jlora.data.read_sft(o.eval_path, option="--eval-data", skip_bad=o.skip_bad_lines)
    else:
      examples, eval_examples = holdout(examples, o, self.batch_options.seed)
    if skipped:
      say(f"data: skipped {len(skipped)} malformed records of {o.data_path} (the first: {skipped[0]})")
    tok = ctx.tokenizer
    self.train, report = self._tokenize(examples, tok, pack=o.pack)
    for line in report.lines():
      say(line)
    self.eval, eval_report = self._tokenize(eval_examples, tok, pack=False)
    if eval_report.truncated:
      say(f"data: {eval_report.truncated} of {len(eval_examples)} eval examples truncated to "
          f"max_seq_len={o.max_seq_len}, as in training")
    b = self.batch_options
    self.batches = jlora.data.Batches(self.train, batch_size=b.batch_size, grad_accum=b.grad_accum, seed=b.seed,
                                      process_index=ctx.process_index, process_count=ctx.process_count)
    n_em = len(eval_examples) if self.eval_options.eval_exact_match == 0 else max(self.eval_options.eval_exact_match,
                                                                                  0)
    self.em_examples = eval_examples[:n_em]
    self.n_train = len(examples)
    self._eval_batch = named_jit("eval_batch", lambda params, mb: self._loss(params, mb, None, aux=False)[:2])

  def start(self, params: Params) -> None:
    self.aux_coef, line = router_aux_coef(self.objective.router_aux_loss_coef, self.ctx.loaded, params)
    if line:
      self.ctx.say(line)

  @property
  def steps_per_epoch(self) -> int:
    return self.batches.steps_per_epoch

  def batch(self, step: int, params: Params = None) -> dict[str, np.ndarray]:
    return self.batches.get(step)

  def loss(self, params: Params, batch: dict[str, jax.Array], key: jax.Array | None
           ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Summed cross-entropy of the trained tokens, and their count.

    On the native decoder the output layer runs in blocks of ``--logits-chunk`` positions, only
    where a token is trained (``jlora.objectives.token_logprobs``): no ``[batch, tokens, vocab]``
    logits. transformers' Flax classes give only logits: those are materialised.

    On a mixture of experts with ``aux_coef`` > 0 (``start``), ``aux_coef`` times the
    load-balancing loss of the micro-batch's real tokens is added per trained token, so
    that the step's mean is transformers' ``loss + router_aux_loss_coef * aux_loss``
    (metric ``aux_loss``). Held-out ``eval_loss`` stays the cross-entropy alone.
    """
    return self._loss(params, batch, key, aux=self.aux_coef > 0)

  def _loss(self, params: Params, batch: dict[str, jax.Array], key: jax.Array | None, *, aux: bool
            ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    model = self.ctx.loaded.model
    if not hasattr(model, "hidden_states"):
      logits = self._wrapped(params, batch["ids"], batch["attention_mask"], batch.get("segment_ids"),
                             lora_rng=key)
      logits = logits[:, :-1].astype(jnp.float32)
      mask = batch["loss_mask"][:, 1:]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["ids"][:, 1:])
      return jnp.sum(ce * mask), jnp.sum(mask), {}
    kwargs = {} if key is None else {"lora_rng": key}
    out = jlora.wrap(model.hidden_states)(params, batch["ids"], attention_mask=batch["attention_mask"],
                                          segment_ids=batch.get("segment_ids"), return_router_logits=aux, **kwargs)
    hidden, router_logits = out if aux else (out, None)
    labels = objectives.next_token_labels(batch["ids"], batch["loss_mask"])
    logps = objectives.token_logprobs(hidden, model.head(params), labels, chunk_size=self.objective.logits_chunk)
    total, count = -jnp.sum(logps), jnp.sum(batch["loss_mask"][:, 1:])
    if not aux:
      return total, count, {}
    lb = load_balancing_loss(router_logits, model.config.num_experts_per_tok, batch["attention_mask"])
    return total + self.aux_coef * lb * count, count, {"aux_loss": lb}

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
    if not self.em_examples:
      return {}, []
    em, rows = exact_match(self.ctx.loaded, params, self.em_examples,
                           chat_template=True if self.data_options.chat_template else None,
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


def router_aux_coef(option: float | None, loaded: Any, params: Params) -> tuple[float, str]:
  """The weight of the load-balancing loss in the SFT loss, and the line that says so (empty: none).

  Unset (``None``): the model's ``router_aux_loss_coef`` (config.json, as transformers) when
  an adapter sits on a router, else 0, as a frozen router's balance is not being trained.
  A value > 0 is used whatever trains; 0 turns it off.

  Raises:
    UserError: a value > 0 for a model without mixture-of-experts layers.
  """
  model = loaded.model
  cfg = getattr(model, "config", None)
  moe = loaded.native and bool(getattr(cfg, "is_moe", False))
  if option is not None and option > 0 and not moe:
    raise UserError(f"--router-aux-loss-coef {option:g}: {loaded.model_id} ({loaded.model_type}) has no "
                    "mixture-of-experts layers; drop the option")
  if not moe or option == 0:
    return 0.0, ""
  kinds = {kind: n for kind, n, _ in jlora.count(params).kinds}
  routers = kinds.get(ROUTER, 0)
  line = "loss: + {:g} x load-balancing loss of the routers ({})"
  if option is not None:
    return float(option), line.format(option, "--router-aux-loss-coef")
  if not routers or not cfg.router_aux_loss_coef:
    return 0.0, ""
  trains = f"{routers} router adapter" + ("s train" if routers > 1 else " trains")
  return cfg.router_aux_loss_coef, line.format(cfg.router_aux_loss_coef, f"config.json's router_aux_loss_coef, as "
                                                f"{trains}; --router-aux-loss-coef 0 turns it off")


def check_max_seq_len(max_seq_len: int, loaded: Any) -> None:
  """Refuses a ``--max-seq-len`` past the positions the model was trained for.

  Raises:
    jlora.finetune.cli.UserError: naming both lengths and the fix.
  """
  limit = loaded.max_positions
  if limit and max_seq_len > limit:
    raise UserError(f"--max-seq-len {max_seq_len} exceeds {loaded.model_id}'s {limit} positions "
                    f"(max_position_embeddings in its config.json); use --max-seq-len {limit} or less")


def exact_match(loaded, params, examples: list[jlora.data.Example], *, chat_template: bool | None,
                max_new_tokens: int, max_prompt_len: int | None = None) -> tuple[float, list[dict]]:
  """Share of examples whose greedy answer equals the reference (whitespace-stripped).

  The prompt is what ``jlora.data.eval_prompt`` gives the model (a conversation up to its last
  answer, through the chat template). ``max_prompt_len``: prompts longer than this keep their
  last tokens (as training keeps the end of a truncated prompt), and never more than the
  model's positions leave room for.
  """
  tok = loaded.tokenizer
  room = loaded.max_positions - max_new_tokens if loaded.max_positions else None
  limits = [n for n in (max_prompt_len, room) if n is not None]
  limit = max(1, min(limits)) if limits else None
  prompts, targets = [], []
  for ex in examples:
    try:
      ids, target = jlora.data.eval_prompt(ex.record, tok, chat_template=chat_template)
    except jlora.data.DataError as e:
      raise jlora.data.DataError(f"{ex.where}: {e}") from None
    prompts.append(ids[-limit:] if limit and len(ids) > limit else ids)
    targets.append(target)
  outs = loaded.generate(params, prompts, max_new_tokens=max_new_tokens)
  rows = []
  for ex, target, o in zip(examples, targets, outs):
    text = tok.decode(o, skip_special_tokens=True)
    prompt = ex.record.prompt if isinstance(ex.record, jlora.data.Prompted) else tok.decode(prompts[len(rows)])
    rows.append({"where": ex.where, "prompt": prompt, "target": target, "output": text,
                 "match": text.strip() == target.strip()})
  return float(np.mean([row["match"] for row in rows])), rows
