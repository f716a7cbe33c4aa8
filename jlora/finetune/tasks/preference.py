"""Preference tuning: DPO, SimPO and ORPO on prompt/chosen/rejected pairs, KTO on labelled answers.

Each is a ``Task`` over ``jlora.data``'s preference tokenization (TRL 1.16's) and
``jlora.objectives``' losses (TRL 1.16's formulas and metric names). The reference of DPO
and KTO is the base with the adapters off (``jlora.unload`` under ``stop_gradient``: the
same weights, no second copy) or, with ``--reference init``, the frozen ``--init-adapter``;
its log-probabilities are computed in the step, or once before training
(``--precompute-reference``, always for ``--reference init``). The logits are computed in
blocks of ``--logits-chunk`` positions and only where the loss reads them.

A step's loss is the mean over its micro-batches of each micro-batch's loss, as in TRL
(``count`` 1 per micro-batch); the metrics are averaged the same way.
"""

from __future__ import annotations

import abc
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jlora
import jlora.data
from jlora import objectives
from jlora.finetune.cli import UserError
from jlora.finetune.options import BatchOptions, DataOptions, EvalOptions, ObjectiveOptions
from jlora.finetune.tasks.base import Params, Task, TaskContext, holdout, named_jit
from jlora.finetune.tasks.sft import check_max_seq_len, exact_match


class _Pairs(Task):
  """What DPO, SimPO and ORPO share: pairs, their batches, held-out metrics; the loss is each one's."""

  uses_reference = False  # DPO: whether the loss reads reference log-probabilities
  shown = ("rewards/accuracies", "rewards/margins")

  def __init__(self, data: DataOptions, batch: BatchOptions, evaluation: EvalOptions, objective: ObjectiveOptions):
    super().__init__(data, batch, evaluation, objective)
    self.reference_logps: dict[str, np.ndarray] | None = None  # precomputed: per split, "chosen"/"rejected"

  # -- data -------------------------------------------------------------------------------------------

  def _tokenize(self, examples, tokenizer) -> tuple[jlora.data.TokenizedPreference, Any]:
    o = self.data_options
    return jlora.data.tokenize_preference(examples, tokenizer, max_len=o.max_seq_len, skip_bad=o.skip_bad_lines)

  def show(self, tokenizer, index: int) -> str:
    examples, _ = jlora.data.read_preference(self.data_options.data_path, skip_bad=self.data_options.skip_bad_lines)
    if not 0 <= index < len(examples):
      raise jlora.data.DataError(f"--show-example {index}: --data holds {len(examples)} pairs (0 to "
                                 f"{len(examples) - 1})")
    data, _ = self._tokenize(examples[index:index + 1], tokenizer)
    text = jlora.data.show_example(data, 0, tokenizer)
    return f"example {index} of {len(examples)}: " + text.partition(": ")[2]

  def prepare(self, ctx: TaskContext) -> None:
    o, say = self.data_options, ctx.say
    self.ctx = ctx
    if not hasattr(ctx.loaded.model, "hidden_states"):
      raise UserError(f"--task {self.name} needs a jlora.models decoder (the log-probabilities come from its "
                      f"hidden states and head); {ctx.loaded.model_id} runs on transformers' Flax classes")
    check_max_seq_len(o.max_seq_len, ctx.loaded)
    examples, skipped = jlora.data.read_preference(o.data_path, skip_bad=o.skip_bad_lines)
    if o.eval_path:
      eval_examples, _ = jlora.data.read_preference(o.eval_path, option="--eval-data", skip_bad=o.skip_bad_lines)
    else:
      examples, eval_examples = holdout(examples, o, self.batch_options.seed)
    if skipped:
      say(f"data: skipped {len(skipped)} malformed records of {o.data_path} (the first: {skipped[0]})")
    self.train, report = self._tokenize(examples, ctx.tokenizer)
    for line in report.lines():
      say(line)
    self.eval, _ = self._tokenize(eval_examples, ctx.tokenizer)
    b = self.batch_options
    self.batches = jlora.data.Batches(self.train, batch_size=b.batch_size, grad_accum=b.grad_accum, seed=b.seed,
                                      process_index=ctx.process_index, process_count=ctx.process_count)
    n_em = len(eval_examples) if self.eval_options.eval_exact_match == 0 else max(self.eval_options.eval_exact_match,
                                                                                  0)
    self.em_examples = [jlora.data.Example(e.where, _as_sft(e.record)) for e in eval_examples[:n_em]]
    self.n_train = len(examples)
    self._eval_batch = named_jit("eval_batch", lambda params, mb: self._loss(params, mb, None,
                                                             reference_in_batch="ref_chosen_logps" in mb))
    self._ref_pass = named_jit("reference_logps", lambda params, mb: objectives.preference_logps(
        ctx.loaded.model, params, mb, reference=False, chunk_size=self.objective.logits_chunk))

  def start(self, params: Params) -> None:
    """DPO with ``--reference init`` or ``--precompute-reference``: the reference's log-probs of every pair,
    once, from the initial tree (the frozen initial adapter, or the base: its adapters unloaded)."""
    o = self.objective
    if not self.uses_reference or not (o.reference == "init" or o.precompute_reference):
      return
    ref = params if o.reference == "init" else jlora.unload(params)
    self.reference_logps = {}
    for split, data in (("train", self.train), ("eval", self.eval)):
      chosen, rejected = [], []
      for rows in _row_blocks(len(data), self.batch_options.batch_size):
        p = self._ref_pass(ref, _rename(data.pairs(rows)))
        chosen.append(np.asarray(p.chosen))
        rejected.append(np.asarray(p.rejected))
      self.reference_logps[split] = {"chosen": np.concatenate(chosen), "rejected": np.concatenate(rejected)}

  # -- batches and loss -------------------------------------------------------------------------------

  @property
  def steps_per_epoch(self) -> int:
    return self.batches.steps_per_epoch

  def _micro(self, rows: np.ndarray, split: str) -> dict[str, np.ndarray]:
    mb = _rename((self.train if split == "train" else self.eval).pairs(rows))
    if self.reference_logps is not None:
      ref = self.reference_logps[split]
      mb["ref_chosen_logps"], mb["ref_rejected_logps"] = ref["chosen"][rows], ref["rejected"][rows]
    return mb

  def batch(self, step: int, params: Params = None) -> dict[str, np.ndarray]:
    micro = [self._micro(rows, "train") for rows in self.batches.indices(step)]
    return {k: np.stack([m[k] for m in micro]) for k in micro[0]}

  def loss(self, params: Params, batch: dict[str, jax.Array], key: jax.Array | None):
    value, metrics = self._loss(params, batch, key, reference_in_batch=self.reference_logps is not None)
    return value, jnp.ones((), jnp.float32), metrics

  @abc.abstractmethod
  def _loss(self, params, batch, key, *, reference_in_batch: bool):
    """``(loss, metrics)`` of one micro-batch: each objective's."""

  # -- evaluation -------------------------------------------------------------------------------------

  def evaluate(self, params: Params) -> dict[str, float]:
    """The loss and metrics over the held-out pairs (batches of ``--batch-size``; the last one may be
    smaller: one more compiled shape), each batch weighted by its pairs."""
    sums: dict[str, float] = {}
    for rows in _row_blocks(len(self.eval), self.batch_options.batch_size):
      value, metrics = self._eval_batch(params, self._micro(rows, "eval"))
      for k, v in {"loss": value, **metrics}.items():
        sums[k] = sums.get(k, 0.0) + float(v) * len(rows)
    return {f"eval_{k}": v / max(len(self.eval), 1) for k, v in sums.items()}

  def generation_eval(self, params: Params) -> tuple[dict[str, float], list[dict]]:
    if not self.em_examples:
      return {}, []
    em, rows = exact_match(self.ctx.loaded, params, self.em_examples, chat_template=None,
                           max_new_tokens=self.eval_options.max_new_tokens,
                           max_prompt_len=self.data_options.max_seq_len)
    return {"exact_match": em}, rows

  def describe(self) -> dict[str, Any]:
    return {"task": self.name, "data": self.data_options.data_path, "train_pairs": self.n_train,
            "eval_pairs": len(self.eval)}

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    t = self.train
    for a in (t.chosen_ids, t.chosen_completion_mask, t.rejected_ids, t.rejected_completion_mask):
      h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]

  def _logps(self, params, batch, key, *, reference: bool, nll: bool = False):
    """The policy's (and, with ``reference``, the reference's) summed completion log-probs of a batch."""
    b = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    return objectives.preference_logps(self.ctx.loaded.model, params, b, reference=reference, nll=nll,
                                       chunk_size=self.objective.logits_chunk, lora_rng=key)


class DPO(_Pairs):
  """Direct preference optimisation (TRL's ``loss_type`` sigmoid, ipo, hinge, robust) against a reference."""

  name = "dpo"
  uses_reference = True

  def _loss(self, params, batch, key, *, reference_in_batch: bool):
    o = self.objective
    p = self._logps(params, batch, key, reference=not reference_in_batch)
    ref_c, ref_r = (batch["ref_chosen_logps"], batch["ref_rejected_logps"]) if reference_in_batch else (
        p.ref_chosen, p.ref_rejected)
    return objectives.dpo_loss(p.chosen, p.rejected, ref_c, ref_r, beta=o.beta, loss_type=o.loss_type,
                               label_smoothing=o.label_smoothing, chosen_counts=p.chosen_counts,
                               rejected_counts=p.rejected_counts)


class SimPO(_Pairs):
  """SimPO: reference-free, length-normalised rewards with a target margin (TRL's CPO ``loss_type="simpo"``)."""

  name = "simpo"

  def _loss(self, params, batch, key, *, reference_in_batch: bool):
    o = self.objective
    p = self._logps(params, batch, key, reference=False)
    return objectives.simpo_loss(p.chosen, p.rejected, p.chosen_counts, p.rejected_counts, beta=o.beta,
                                 gamma=o.simpo_gamma, cpo_alpha=o.cpo_alpha)


class ORPO(_Pairs):
  """ORPO: the chosen answers' NLL plus beta times the odds-ratio term; reference-free."""

  name = "orpo"

  def _loss(self, params, batch, key, *, reference_in_batch: bool):
    p = self._logps(params, batch, key, reference=False, nll=True)
    return objectives.orpo_loss(p.chosen, p.rejected, p.chosen_counts, p.rejected_counts, nll_logps=p.nll_logps,
                                nll_counts=p.nll_counts, beta=self.objective.beta)


def _rename_key(k: str) -> str:
  return "input_ids" if k == "ids" else k


def _rename(mb: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """jlora.data's batch keys -> TRL's collator names (what jlora.objectives reads)."""
  return {_rename_key(k): v for k, v in mb.items()}


def _row_blocks(n: int, size: int) -> list[np.ndarray]:
  """``0..n-1`` in consecutive blocks of ``size`` rows (the last one shorter)."""
  return [np.arange(s, min(s + size, n)) for s in range(0, n, size)]


def _as_sft(record: jlora.data.Preference) -> jlora.data.Chat | jlora.data.Prompted:
  """A preference pair as the supervised record of its chosen answer (what exact match compares against)."""
  if isinstance(record.prompt, str):
    return jlora.data.Prompted(record.prompt, record.chosen)
  return jlora.data.Chat(messages=tuple(record.prompt) + tuple(record.chosen), tools=record.tools,
                         template_kwargs=record.template_kwargs)


class KTO(Task):
  """KTO: answers labelled desirable or not (``prompt``/``completion``/``label``; preference pairs are
  unpaired), against a reference, with the KL estimate of mismatched pairs.

  As TRL pairs them: in the data's order, in blocks of ``--batch-size``, each prompt is paired with
  the answer of the example before it (the block's first with its last). The pairing is fixed
  before training; a step's batch takes each example with its mismatched twin.
  """

  name = "kto"
  shown = ("rewards/chosen", "rewards/rejected", "kl")

  def show(self, tokenizer, index: int) -> str:
    examples, _ = jlora.data.read_unpaired(self.data_options.data_path, skip_bad=self.data_options.skip_bad_lines)
    if not 0 <= index < len(examples):
      raise jlora.data.DataError(f"--show-example {index}: --data holds {len(examples)} labelled answers (0 to "
                                 f"{len(examples) - 1})")
    data, _ = jlora.data.tokenize_unpaired(examples[index:index + 1], tokenizer,
                                           max_len=self.data_options.max_seq_len)
    return f"example {index} of {len(examples)}: " + jlora.data.show_example(data, 0, tokenizer).partition(": ")[2]

  def prepare(self, ctx: TaskContext) -> None:
    o, say = self.data_options, ctx.say
    self.ctx = ctx
    if not hasattr(ctx.loaded.model, "hidden_states"):
      raise UserError(f"--task kto needs a jlora.models decoder; {ctx.loaded.model_id} runs on transformers' Flax "
                      "classes")
    size = self.batch_options.batch_size
    if size < 2:
      raise UserError("--task kto needs --batch-size 2 or more: its KL estimate pairs each prompt with another "
                      "example's answer in the same block (as TRL does)")
    check_max_seq_len(o.max_seq_len, ctx.loaded)
    examples, skipped = jlora.data.read_unpaired(o.data_path, skip_bad=o.skip_bad_lines)
    if o.eval_path:
      eval_examples, _ = jlora.data.read_unpaired(o.eval_path, option="--eval-data", skip_bad=o.skip_bad_lines)
    else:  # a contiguous tail: the two halves of an unpaired pair stay together
      examples, eval_examples = holdout(examples, o, self.batch_options.seed, at_least=2, contiguous=True)
    if skipped:
      say(f"data: skipped {len(skipped)} malformed records of {o.data_path} (the first: {skipped[0]})")
    tok, max_len = ctx.tokenizer, o.max_seq_len
    self.train, report = jlora.data.tokenize_unpaired(examples, tok, max_len=max_len, skip_bad=o.skip_bad_lines)
    for line in report.lines():
      say(line)
    self.eval, _ = jlora.data.tokenize_unpaired(eval_examples, tok, max_len=max_len, skip_bad=o.skip_bad_lines)
    self.rows = {"train": self._with_kl(self.train, size), "eval": self._with_kl(self.eval, size)}
    desirable = int(self.train.label.sum())
    ratio = (desirable * self.objective.kto_desirable_weight) / max(
        (len(self.train) - desirable) * self.objective.kto_undesirable_weight, 1e-9)
    if not 1.0 <= ratio <= 4 / 3:
      say(f"data: {desirable} desirable and {len(self.train) - desirable} undesirable answers; KTO's authors "
          f"advise --kto-desirable-weight and --kto-undesirable-weight putting their weighted ratio in [1, 4/3] "
          f"(it is {ratio:.2f})")
    b = self.batch_options
    self.batches = jlora.data.Batches(self.train, batch_size=b.batch_size, grad_accum=b.grad_accum, seed=b.seed,
                                      process_index=ctx.process_index, process_count=ctx.process_count)
    self.n_train = len(examples)
    model, chunk = ctx.loaded.model, self.objective.logits_chunk
    self._eval_batch = named_jit("eval_batch", lambda params, mb: self._loss(params, mb, None))
    self._ref_pass = named_jit("reference_logps", lambda params, mb: objectives.kto_logps(model, params, mb, chunk_size=chunk))

  @staticmethod
  def _with_kl(data: jlora.data.TokenizedUnpaired, size: int) -> dict[str, np.ndarray]:
    """Every example's arrays with its mismatched twin's (``KL_*``), blocks of ``size`` in data order."""
    kl = [data.mismatched(rows) for rows in _row_blocks(len(data), size)]
    return {"input_ids": data.ids, "attention_mask": data.attention_mask, "completion_mask": data.completion_mask,
            "label": data.label, **{f"KL_{_rename_key(k)}": np.concatenate([b[k] for b in kl]) for k in kl[0]}}

  def start(self, params: Params) -> None:
    """``--reference init`` or ``--precompute-reference``: the reference's log-probs of every answer and of
    its mismatched twin, once, from the initial tree."""
    o = self.objective
    if not (o.reference == "init" or o.precompute_reference):
      return
    ref = params if o.reference == "init" else jlora.unload(params)
    for rows in self.rows.values():
      logps = [self._ref_pass(ref, {k: v[r] for k, v in rows.items() if not k.startswith("ref_")})
               for r in _row_blocks(len(rows["label"]), self.batch_options.batch_size)]
      rows["ref_logps"] = np.concatenate([np.asarray(lp.ref) for lp in logps])
      rows["ref_kl_logps"] = np.concatenate([np.asarray(lp.ref_kl) for lp in logps])

  @property
  def steps_per_epoch(self) -> int:
    return self.batches.steps_per_epoch

  def batch(self, step: int, params: Params = None) -> dict[str, np.ndarray]:
    idx = self.batches.indices(step)  # (grad_accum, rows)
    return {k: v[idx] for k, v in self.rows["train"].items()}

  def loss(self, params: Params, batch: dict[str, jax.Array], key: jax.Array | None):
    value, metrics = self._loss(params, batch, key)
    return value, jnp.ones((), jnp.float32), metrics

  def _loss(self, params, batch, key):
    o = self.objective
    logps = objectives.kto_logps(self.ctx.loaded.model, params, batch, chunk_size=o.logits_chunk, lora_rng=key)
    ref, ref_kl = (batch["ref_logps"], batch["ref_kl_logps"]) if "ref_logps" in batch else (logps.ref, logps.ref_kl)
    return objectives.kto_loss(logps.policy, ref, logps.policy_kl, ref_kl, batch["label"], beta=o.beta,
                               desirable_weight=o.kto_desirable_weight, undesirable_weight=o.kto_undesirable_weight)

  def evaluate(self, params: Params) -> dict[str, float]:
    """The loss and metrics over the held-out answers, batches weighted by size; a metric a batch cannot
    compute (a label it lacks) is averaged over the batches that can."""
    rows = self.rows["eval"]
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for r in _row_blocks(len(rows["label"]), self.batch_options.batch_size):
      value, metrics = self._eval_batch(params, {k: v[r] for k, v in rows.items()})
      for k, v in {"loss": value, **metrics}.items():
        if not np.isnan(float(v)):
          sums[k] = sums.get(k, 0.0) + float(v) * len(r)
          counts[k] = counts.get(k, 0.0) + len(r)
    return {f"eval_{k}": sums[k] / counts[k] for k in sums}

  def describe(self) -> dict[str, Any]:
    return {"task": self.name, "data": self.data_options.data_path, "train_answers": self.n_train,
            "eval_answers": len(self.eval)}

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for a in (self.train.ids, self.train.completion_mask, self.train.label):
      h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]
