"""GRPO and its variants (``--task grpo``): rollouts from the unmerged adapters, rewards, the clipped objective.

Each step's batch is made here, from the current adapters (``batch(step, params)``):

1. **Rollout.** The step's prompts (``batch_size * grad_accum / num_generations`` of them, in a
   shuffled order per epoch, each process its own) are repeated ``G = num_generations`` times
   and continued by the jitted KV-cache generator (``jlora.objectives.rollout``) with the LoRA
   tree as it is: nothing merged, nothing copied, the rows split over the mesh's data axes as
   training splits them. The sampling key comes from ``(seed, step)``.
2. **Rewards and advantages.** Every ``--reward`` function scores the decoded completions
   (``jlora.finetune.rewards``); their weighted sum gives the group-relative advantages
   (``jlora.objectives.grpo_advantages``). ``--dynamic-sampling`` takes the groups whose rewards
   are all equal out of the loss.
3. **Log-probabilities kept from the rollout** (the same jitted pass over the rows, before any
   update): the old policy's when ``num_iterations > 1``; the reference's when ``beta > 0``
   (the base: ``jlora.unload`` of the same tree, one copy of the weights).

The rows are shuffled and cut into ``grad_accum`` micro-batches (TRL's ``steps_per_generation``
= its gradient accumulation), and serve ``num_iterations`` optimizer steps; ``state()`` holds
them (and the log-probs), so that a resumed run continues on the same rollout. The loss of a
micro-batch is ``jlora.objectives.grpo_loss_terms``' ``(total, count)``: summed over the
micro-batches it is TRL's aggregation for each ``--loss-type`` (that module's docstring).

Records: ``prompt`` (a string, or a list of messages: the chat template renders them with the
generation prompt) or ``messages`` (a conversation: everything before its last assistant turn
is the prompt, and that turn's content is the ``completion`` field when the record has neither
``completion`` nor ``answer``). Every other field goes to the reward functions.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

import jlora
import jlora.data
from jlora import objectives
from jlora.data._load import _read as read_examples
from jlora.data._records import _Bad, _extras, _messages, _object
from jlora.finetune import rewards as rewards_lib
from jlora.finetune.cli import UserError
from jlora.finetune.tasks.base import Params, Task, TaskContext, named_jit
from jlora.finetune.tasks.sft import check_max_seq_len
from jlora.objectives._rollout import local_rows, place_rows

SAMPLES_PER_EVAL = 4  # completions written to eval_examples.jsonl per evaluation
_ROLLOUT_STREAM = 0x726F6C6C  # folded into (seed, step): the rollout keys are not the dropout keys


class PromptRecord:
  """A GRPO record: its prompt (a string, or messages as the template reads them) and its other fields."""

  def __init__(self, prompt: str | list[dict], fields: dict[str, Any], tools=None, template_kwargs=None):
    self.prompt = prompt
    self.fields = fields
    self.tools = tools
    self.template_kwargs = template_kwargs or {}


def parse_prompt(row: jlora.data.Row) -> list[jlora.data.Example]:
  """A row as a GRPO record (see the module docstring).

  Raises:
    jlora.data.DataError: no prompt, or a malformed one (naming the file and line).
  """
  try:
    obj = _object(row.value)
    extras = _extras(obj)
    fields = dict(obj)
    if "prompt" in obj:
      prompt = obj["prompt"]
      if isinstance(prompt, list):
        prompt = [m.as_dict() for m in _messages(prompt, "prompt")]
      elif not isinstance(prompt, str) or not prompt:
        raise _Bad(f"prompt must be a non-empty string or a list of messages, got {prompt!r}")
      del fields["prompt"]
    else:
      key = next((k for k in ("messages", "conversations") if k in obj), None)
      if key is None:
        raise _Bad(f"no prompt (have {sorted(obj)}); a --task grpo record needs prompt (a string or messages) or "
                   "messages")
      messages = [m.as_dict() for m in _messages(obj[key], key)]
      del fields[key]
      if messages[-1]["role"] == "assistant":
        last = messages.pop()
        content = last["content"]
        if isinstance(content, list):
          content = "".join(part["text"] for part in content)
        if "completion" not in fields and "answer" not in fields:
          fields["completion"] = content or ""
      if not messages:
        raise _Bad(f"{key} holds only an assistant turn; the prompt needs a message before it")
      prompt = messages
  except _Bad as e:
    raise jlora.data.DataError(f"{row.where}: {e}; fix the record or pass --skip-bad-lines") from None
  return [jlora.data.Example(row.where, PromptRecord(prompt, fields, extras.get("tools"),
                                                     extras.get("template_kwargs")))]


def _mesh_of(params: Any):
  leaf = jax.tree.leaves(params)[0]
  s = getattr(leaf, "sharding", None)
  return s.mesh if isinstance(s, NamedSharding) else None


class GRPO(Task):
  """Group relative policy optimisation with TRL 1.16's loss types, rewards, advantages and metric names."""

  name = "grpo"
  shown = ("reward", "kl")

  # -- data -------------------------------------------------------------------------------------------

  def _read(self, path: str, option: str):
    return read_examples(path, option, self.data_options.skip_bad_lines, parse_prompt)

  def _prompt_ids(self, record: PromptRecord, tokenizer, where: str) -> list[int]:
    if isinstance(record.prompt, str):
      if self.data_options.chat_template:
        return jlora.data.chat_prompt_ids(tokenizer, record.prompt)
      return list(tokenizer(record.prompt, add_special_tokens=False)["input_ids"])
    msgs = tuple(jlora.data.Message(m["role"], m.get("content"), {k: v for k, v in m.items()
                                                                  if k not in ("role", "content")})
                 for m in record.prompt)
    chat = jlora.data.Chat(msgs + (jlora.data.Message("assistant", "-"),), tools=record.tools,
                           template_kwargs=record.template_kwargs)
    try:
      return jlora.data.eval_prompt(chat, tokenizer)[0]
    except jlora.data.DataError as e:
      raise jlora.data.DataError(f"{where}: {e}") from None

  def _tokenize(self, examples, tokenizer) -> tuple[list[list[int]], int]:
    out, cut = [], 0
    limit = self.data_options.max_seq_len
    for ex in examples:
      ids = self._prompt_ids(ex.record, tokenizer, ex.where)
      if not ids:
        raise jlora.data.DataError(f"{ex.where}: the prompt has no tokens; fix the record or pass --skip-bad-lines")
      if len(ids) > limit:  # the prompt's end stays (what the answer follows)
        ids, cut = ids[-limit:], cut + 1
      out.append(ids)
    return out, cut

  def show(self, tokenizer, index: int) -> str:
    examples, _ = self._read(self.data_options.data_path, "--data")
    if not 0 <= index < len(examples):
      raise jlora.data.DataError(f"--show-example {index}: --data holds {len(examples)} prompts (0 to "
                                 f"{len(examples) - 1})")
    ex = examples[index]
    (ids,), _ = self._tokenize([ex], tokenizer)
    return (f"example {index} of {len(examples)}: {ex.where} ({len(ids)} prompt tokens; the completions are "
            f"sampled, {self.objective.num_generations} per prompt)\n{tokenizer.decode(ids)}\n"
            f"fields for the rewards: {json.dumps(ex.record.fields, ensure_ascii=False)}")

  def prepare(self, ctx: TaskContext) -> None:
    o, b, obj, say = self.data_options, self.batch_options, self.objective, ctx.say
    self.ctx = ctx
    loaded = ctx.loaded
    if not hasattr(loaded.model, "hidden_states"):
      raise UserError(f"--task grpo needs a jlora.models decoder (rollouts run on its KV-cache generator); "
                      f"{loaded.model_id} runs on transformers' Flax classes")
    check_max_seq_len(o.max_seq_len, loaded)
    self.rewards = rewards_lib.rewards_for(obj.reward, max_completion_length=obj.max_completion_length)
    examples, skipped = self._read(o.data_path, "--data")
    if o.eval_path:
      eval_examples, _ = self._read(o.eval_path, "--eval-data")
    else:
      order = np.random.default_rng(b.seed).permutation(len(examples))
      n_eval = max(1, int(len(examples) * o.eval_fraction))
      eval_examples = [examples[i] for i in order[:n_eval]]
      examples = [examples[i] for i in order[n_eval:]]
    if skipped:
      say(f"data: skipped {len(skipped)} malformed records of {o.data_path} (the first: {skipped[0]})")
    needs_answer = [r.text for r in self.rewards if r.fn in (rewards_lib.exact_match, rewards_lib.contains)]
    for ex in (*examples, *eval_examples) if needs_answer else ():
      if not any(isinstance(ex.record.fields.get(k), str) for k in ("answer", "completion")):
        raise jlora.data.DataError(f"{ex.where}: --reward {needs_answer[0]} compares the completion with the record's "
                                   "answer or completion field (a string), which this record lacks; add it, or use "
                                   "other rewards")
    tok = ctx.tokenizer
    self.train, cut = self._tokenize(examples, tok)
    self.eval, eval_cut = self._tokenize(eval_examples, tok)
    if cut or eval_cut:
      say(f"data: {cut} training and {eval_cut} eval prompts longer than --max-seq-len {o.max_seq_len} keep their "
          "last tokens")
    self.train_examples, self.eval_examples = examples, eval_examples
    longest = max(len(p) for p in self.train + self.eval)
    self.prompt_length = -(-longest // 8) * 8
    room = loaded.max_positions
    if room and self.prompt_length + obj.max_completion_length > room:
      raise UserError(f"prompts of up to {longest} tokens (padded to {self.prompt_length}) and --max-completion-length "
                      f"{obj.max_completion_length} exceed {loaded.model_id}'s {room} positions; lower "
                      f"--max-seq-len (prompts keep their last tokens) or --max-completion-length")

    g, procs = obj.num_generations, ctx.process_count
    if b.batch_size % procs:
      raise UserError(f"--batch-size {b.batch_size} does not split over {procs} processes; use a multiple of the "
                      "process count")
    self.rows = b.batch_size // procs  # this process's rows of a micro-batch
    if (self.rows * b.grad_accum) % g:
      raise UserError(f"each process generates whole groups: its completions per step, --batch-size / processes * "
                      f"--grad-accum = {self.rows * b.grad_accum}, must be a multiple of --num-generations {g}")
    self.prompts_per_step = b.batch_size * b.grad_accum // g  # all processes'
    if len(self.train) < self.prompts_per_step:
      raise jlora.data.DataError(f"the {len(self.train)} training prompts are fewer than one step's "
                                 f"{self.prompts_per_step} (--batch-size * --grad-accum / --num-generations); lower "
                                 "--batch-size or --grad-accum, or add data")
    self.width = self.prompt_length + obj.max_completion_length
    eos = set(loaded.model.config.eos_token_ids)
    if tok.eos_token_id is not None:
      eos.add(int(tok.eos_token_id))
    self.eos = tuple(sorted(eos))
    self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
    self.mesh = _mesh_of(loaded.params)
    model, chunk, temp = loaded.model, obj.logits_chunk, obj.temperature
    self._logps_pass = named_jit("policy_logps", lambda p, ids, comp, attn: objectives.model_token_logprobs(
        model, p, ids, comp, attention_mask=attn, chunk_size=chunk, temperature=temp))
    self._ref_pass = named_jit("reference_logps", lambda p, ids, comp, attn: objectives.model_token_logprobs(
        model, p, ids, comp, attention_mask=attn, chunk_size=chunk, temperature=temp, reference=True))
    self.n_em = len(self.eval) if self.eval_options.eval_exact_match == 0 else max(
        self.eval_options.eval_exact_match, 0)
    # What the loop's state holds between steps.
    self._held = -1  # the generation whose rows self._rows holds
    self._rows = self._zeros()
    self._placed: tuple[int, Any] | None = None  # (generation, state()) placed on the mesh
    self._pending: dict[str, list[float]] = {}
    self._samples: list[dict] = []
    self._step = 0
    self._handed_at: float | None = None  # when the last batch left batch() (the train steps run from then on)
    self._trained_tokens = 0
    self._aside = 0.0  # seconds of evaluation since then (not training)

  # -- rollouts ---------------------------------------------------------------------------------------

  @property
  def steps_per_epoch(self) -> int:
    return (len(self.train) // self.prompts_per_step) * self.objective.num_iterations

  def _zeros(self) -> dict[str, np.ndarray]:
    a, r, w = self.batch_options.grad_accum, self.rows, self.width
    out = {"input_ids": np.zeros((a, r, w), np.int32), "attention_mask": np.zeros((a, r, w), np.int32),
           "completion_mask": np.zeros((a, r, w), np.int32), "advantages": np.zeros((a, r), np.float32)}
    if self.objective.num_iterations > 1:
      out["old_logps"] = np.zeros((a, r, w), np.float32)
    if self.objective.beta > 0:
      out["ref_logps"] = np.zeros((a, r, w), np.float32)
    return out

  def _prompts_of(self, generation: int) -> list[int]:
    """This process's prompt indices for rollout ``generation`` (an epoch: a permutation by (seed, epoch))."""
    per_epoch = len(self.train) // self.prompts_per_step
    epoch, i = divmod(generation, per_epoch)
    perm = np.random.default_rng([self.batch_options.seed, epoch]).permutation(len(self.train))
    mine = perm[i * self.prompts_per_step:(i + 1) * self.prompts_per_step]
    local = self.prompts_per_step // self.ctx.process_count
    return mine[self.ctx.process_index * local:(self.ctx.process_index + 1) * local].tolist()

  def _gather(self, x: np.ndarray) -> np.ndarray:
    """Every process's rows of ``x`` (this process's, alone)."""
    if self.ctx.process_count == 1:
      return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  def _generate(self, params: Params, prompt_ids: list[list[int]], *, key, greedy: bool) -> objectives.Rollout:
    o = self.objective
    return objectives.rollout(
        self.ctx.loaded.model, params, prompt_ids, num_generations=1 if greedy else o.num_generations,
        max_new_tokens=o.max_completion_length, key=key, temperature=0.0 if greedy else o.temperature,
        top_p=o.top_p, top_k=o.top_k, stop=o.stop, tokenizer=self.ctx.tokenizer, eos_id=self.eos, pad_id=self.pad_id,
        prompt_length=self.prompt_length, mesh=self.mesh)

  def _score(self, r: objectives.Rollout, examples: list, repeat: int) -> np.ndarray:
    """``(rows, K)`` rewards of a rollout's rows (each example ``repeat`` times)."""
    records = [ex.record for ex in examples for _ in range(repeat)]
    keys = sorted({k for rec in records for k in rec.fields})
    fields = {k: [rec.fields.get(k) for rec in records] for k in keys}
    values = rewards_lib.score(self.rewards, [rec.prompt for rec in records], r.completions, r.completion_ids,
                               fields)
    return np.asarray(values, np.float64).T.reshape(len(records), len(self.rewards))

  def _advantages(self, combined: np.ndarray, everyone: np.ndarray) -> np.ndarray:
    o = self.objective
    g = o.num_generations
    if o.scale_rewards != "batch" or self.ctx.process_count == 1:
      return np.asarray(objectives.grpo_advantages(combined.astype(np.float32), num_generations=g,
                                                   scale_rewards=o.scale_rewards))
    groups = combined.reshape(-1, g)  # the batch's std is every process's
    adv = (groups - groups.mean(axis=1, keepdims=True)).reshape(-1)
    return (adv / (np.std(everyone, ddof=1) + 1e-4)).astype(np.float32)

  def _rollout(self, generation: int, params: Params) -> None:
    o, b = self.objective, self.batch_options
    started = time.perf_counter()
    if self._handed_at is not None:  # the train steps since the last rollout have finished once params are ready
      jax.block_until_ready(params)
      seconds = time.perf_counter() - self._handed_at - self._aside
      if seconds > 0 and self._trained_tokens:
        self._record({"train_tokens_per_s": self._trained_tokens / seconds})
      started = time.perf_counter()
    step = generation * o.num_iterations
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(b.seed), _ROLLOUT_STREAM), step)
    indices = self._prompts_of(generation)
    r = self._generate(params, [self.train[i] for i in indices], key=key, greedy=False)
    generated = time.perf_counter() - started
    per_func = self._score(r, [self.train_examples[i] for i in indices], o.num_generations)
    weights = np.asarray([rw.weight for rw in self.rewards])
    combined = per_func @ weights
    all_rewards = self._gather(per_func)
    advantages = self._advantages(combined, all_rewards @ weights)

    loss_mask = r.completion_mask.copy()
    metrics = objectives.grpo_reward_metrics(all_rewards, num_generations=o.num_generations,
                                             names=[rw.name for rw in self.rewards], weights=weights,
                                             scale_rewards=o.scale_rewards)
    if o.dynamic_sampling:
      flat = np.std(combined.reshape(-1, o.num_generations), axis=1, ddof=1) <= 1e-8
      loss_mask[np.repeat(flat, o.num_generations)] = 0
      metrics["dropped_groups"] = float(self._gather(np.asarray([flat.sum()], np.float64)).sum())
    lengths = self._gather(r.completion_lengths.astype(np.float64))
    truncated = self._gather(r.truncated.astype(np.float64))
    ended = lengths[truncated == 0]
    ended = ended if ended.size else np.zeros(1)
    metrics.update({
        "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()), "completions/clipped_ratio": float(truncated.mean()),
        "completions/mean_terminated_length": float(ended.mean()),
        "completions/min_terminated_length": float(ended.min()),
        "completions/max_terminated_length": float(ended.max()),
        "rollout_tokens_per_s": float(lengths.sum()) / max(generated, 1e-9),
    })

    # Shuffled (TRL shuffles the generation batch), cut into micro-batches.
    order = np.random.default_rng([b.seed, generation, self.ctx.process_index]).permutation(len(advantages))
    a, rows = b.grad_accum, self.rows
    shape = lambda x: x[order].reshape((a, rows) + x.shape[1:])  # noqa: E731
    out = {"input_ids": shape(r.input_ids), "attention_mask": shape(r.attention_mask),
           "completion_mask": shape(loss_mask), "advantages": shape(advantages.astype(np.float32))}
    passes = [(k, f) for k, f in (("old_logps", self._logps_pass if o.num_iterations > 1 else None),
                                  ("ref_logps", self._ref_pass if o.beta > 0 else None)) if f is not None]
    for name, fn in passes:  # per micro-batch: the training step's shapes, its memory
      out[name] = np.stack([local_rows(fn(params, *(place_rows(out[k][m], self.mesh) for k in
                                                   ("input_ids", "completion_mask", "attention_mask"))))
                            for m in range(a)])
    self._rows, self._held = out, generation
    self._trained_tokens = 0
    self._tokens_per_step = int(self._gather(np.asarray([r.attention_mask.sum()], np.int64)).sum())
    metrics["rollout_seconds"] = time.perf_counter() - started
    self._record(metrics)

  def _record(self, metrics: dict[str, float]) -> None:
    for k, v in metrics.items():
      self._pending.setdefault(k, []).append(float(v))

  def batch(self, step: int, params: Params = None) -> dict[str, np.ndarray]:
    if params is None:  # shapes only (compiling, the memory check)
      return self._zeros()
    generation = step // self.objective.num_iterations
    if generation != self._held:
      self._rollout(generation, params)
    self._step = step + 1  # steps done once this batch is trained (evaluations after it say so)
    self._trained_tokens += self._tokens_per_step
    self._handed_at, self._aside = time.perf_counter(), 0.0
    return dict(self._rows)

  def example_batch(self) -> dict[str, np.ndarray]:
    return self._zeros()

  def state(self) -> dict[str, Any]:
    """The rollout batch in use and its generation (-1: none yet), placed like the step's batches."""
    if self._placed is not None and self._placed[0] == self._held:
      return self._placed[1]
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in self._rows.items()}
    state = {"generation": np.asarray(self._held, np.int64), **{k: place_rows(v, self.mesh) for k, v in flat.items()}}
    self._placed = (self._held, state)
    return state

  def set_state(self, state: Any) -> None:
    a = self.batch_options.grad_accum
    self._held = int(np.asarray(state["generation"]))
    self._rows = {k: local_rows(v).reshape((a, -1) + tuple(np.shape(v)[1:])) for k, v in state.items()
                  if k != "generation"}
    self._placed = None
    self._tokens_per_step = int(self._gather(np.asarray([self._rows["attention_mask"].sum()], np.int64)).sum())

  def pop_metrics(self) -> dict[str, float]:
    out = {k: float(np.mean(v)) for k, v in self._pending.items()}
    self._pending = {}
    return out

  # -- loss -------------------------------------------------------------------------------------------

  def loss(self, params: Params, batch: dict[str, jax.Array], key: jax.Array | None):
    """``grpo_loss_terms`` of a micro-batch: the policy's log-probs (logits / temperature) at its completion tokens."""
    o = self.objective
    ids, comp = batch["input_ids"], batch["completion_mask"]
    logps = objectives.model_token_logprobs(self.ctx.loaded.model, params, ids, comp,
                                            attention_mask=batch["attention_mask"], chunk_size=o.logits_chunk,
                                            temperature=o.temperature, lora_rng=key)
    mask = objectives.next_token_labels(ids, comp) >= 0
    return objectives.grpo_loss_terms(logps, batch["advantages"], mask, old_logps=batch.get("old_logps"),
                                      ref_logps=batch.get("ref_logps"), loss_type=o.loss_type, epsilon=o.epsilon,
                                      epsilon_high=o.epsilon_high, beta=o.beta,
                                      importance_sampling_level=o.importance_sampling_level,
                                      max_completion_length=o.max_completion_length)

  # -- evaluation -------------------------------------------------------------------------------------

  def evaluate(self, params: Params) -> dict[str, float]:
    """Greedy completions of the held-out prompts, scored by the rewards: ``eval_reward`` (their weighted sum),
    each function's ``eval_rewards/<name>/mean``, the completions' mean length and clipped ratio."""
    started = time.perf_counter()
    size, procs = self.batch_options.batch_size, self.ctx.process_count
    per = size // procs
    sums = np.zeros(len(self.rewards))
    lengths = truncated = 0.0
    samples = []
    for start in range(0, len(self.eval), size):
      block = list(range(start, min(start + size, len(self.eval))))
      block += [block[-1]] * (size - len(block))  # one compiled shape; the repeats are not counted
      mine = block[self.ctx.process_index * per:(self.ctx.process_index + 1) * per]
      r = self._generate(params, [self.eval[i] for i in mine], key=jax.random.key(0), greedy=True)
      values = self._score(r, [self.eval_examples[i] for i in mine], 1)
      real = np.asarray([start + self.ctx.process_index * per + j < len(self.eval) for j in range(per)])
      sums += values[real].sum(axis=0)
      lengths += float(r.completion_lengths[real].sum())
      truncated += float(r.truncated[real].sum())
      for j in range(per):
        if real[j] and len(samples) < SAMPLES_PER_EVAL:
          ex = self.eval_examples[mine[j]]
          samples.append({"step": self._step, "where": ex.where, "prompt": ex.record.prompt,
                          "completion": r.completions[j],
                          "rewards": {rw.name: float(values[j, k]) for k, rw in enumerate(self.rewards)}})
    totals = self._gather(np.concatenate([sums, [lengths, truncated]])[None]).sum(axis=0)
    n = len(self.eval)
    weights = np.asarray([rw.weight for rw in self.rewards])
    out = {"eval_reward": float(totals[:-2] @ weights) / n}
    out.update({f"eval_rewards/{rw.name}/mean": float(totals[k]) / n for k, rw in enumerate(self.rewards)})
    out["eval_completions/mean_length"] = float(totals[-2]) / n
    out["eval_completions/clipped_ratio"] = float(totals[-1]) / n
    self._samples.extend(samples)
    self._aside += time.perf_counter() - started
    return out

  def generation_eval(self, params: Params) -> tuple[dict[str, float], list[dict]]:
    """Held-out exact match (greedy completion, stripped, equal to the answer/completion field), and the rows of
    ``eval_examples.jsonl``: the sampled completions of each evaluation, then each exact-match prompt's."""
    started = time.perf_counter()
    examples = [(i, ex) for i, ex in enumerate(self.eval_examples[:self.n_em])
                if any(isinstance(ex.record.fields.get(k), str) for k in ("answer", "completion"))]
    rows = list(self._samples)
    metrics = {}
    if examples:
      tok = self.ctx.tokenizer
      outs = self.ctx.loaded.generate(params, [self.eval[i] for i, _ in examples],
                                      max_new_tokens=self.objective.max_completion_length)
      matches = []
      for (i, ex), out in zip(examples, outs):
        target = next(ex.record.fields[k] for k in ("answer", "completion") if isinstance(ex.record.fields.get(k), str))
        text = tok.decode(out, skip_special_tokens=True)
        matches.append(text.strip() == target.strip())
        rows.append({"step": self._step, "where": ex.where, "prompt": ex.record.prompt, "completion": text,
                     "target": target, "match": matches[-1]})
      metrics["exact_match"] = float(np.mean(matches))
    self._aside += time.perf_counter() - started
    return metrics, rows

  def describe(self) -> dict[str, Any]:
    return {"task": self.name, "data": self.data_options.data_path, "train_prompts": len(self.train),
            "eval_prompts": len(self.eval), "rewards": [rw.text for rw in self.rewards]}

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for ids, ex in zip(self.train, self.train_examples):
      h.update(np.asarray(ids, np.int64).tobytes())
      h.update(json.dumps(ex.record.fields, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
