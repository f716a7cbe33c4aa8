"""The fine-tuning loop: jitted LoRA steps, eval, checkpoints, resume, preemption."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora import _checkpoint as ck
from jlora._lazy import is_lazy_node
from jlora._tree import leaves_with_paths
from jlora.finetune import data as data_lib
from jlora.finetune import model as model_lib
from jlora.finetune import quantize as quantize_lib
from jlora.finetune import rundir
from jlora.finetune.checkpoint import START_FRESH, TrainCheckpointer
from jlora.finetune import hf_flax, variants
from jlora.finetune.cli import UserError
from jlora.finetune.config import TrainConfig
from jlora.finetune.metrics import MetricsLog, plot_loss

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: "stopped, resumable"


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  if cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, decay_steps)
  elif cfg.schedule == "linear":
    after = optax.linear_schedule(cfg.lr, 0.0, decay_steps)
  else:
    after = optax.constant_schedule(cfg.lr)
  sched = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup]) if warmup else after
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
  parts.append(optax.adamw(sched, weight_decay=cfg.weight_decay))
  return optax.chain(*parts)


def token_loss_fn(forward, *, remat: bool, regularizer=None):
  """Summed token cross-entropy and token count; ``remat`` checkpoints the whole loss (legacy models:
  the native decoder rematerialises per layer itself). ``regularizer(adapters)`` (AdaLoRA's
  orthogonality term) is added to the mean token loss."""
  wrapped = jlora.wrap(forward)

  def token_loss(adapters, frozen, mb, key):
    logits = wrapped(jlora.combine(adapters, frozen), mb["ids"], mb["attention_mask"], mb.get("segment_ids"),
                     lora_rng=key)
    logits = logits[:, :-1].astype(jnp.float32)
    mask = mb["loss_mask"][:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, mb["ids"][:, 1:])
    total = jnp.sum(ce * mask)
    if regularizer is not None:  # per token, so that the step's mean loss gets it once
      total = total + regularizer(adapters) * jnp.sum(mask)
    return total, jnp.sum(mask)

  if remat:
    token_loss = jax.checkpoint(token_loss, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  return token_loss


def make_train_step(forward, tx, *, remat: bool, use_dropout: bool, regularizer=None, shardings=None):
  """The jitted train step; ``shardings``: those of ``(adapters, opt_state)``, kept by its outputs."""
  token_loss = token_loss_fn(forward, remat=remat, regularizer=regularizer)

  def step(adapters, opt_state, frozen, batch, key):
    accum = batch["ids"].shape[0]
    keys = jax.random.split(key, accum)

    def micro(carry, xs):
      g_acc, l_acc, n_acc = carry
      mb, k = xs
      (l, n), g = jax.value_and_grad(token_loss, has_aux=True)(adapters, frozen, mb, k if use_dropout else None)
      return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, n_acc + n), None

    zeros = jax.tree.map(jnp.zeros_like, adapters)
    (g, loss_sum, n), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), (batch, keys))
    n = jnp.maximum(n, 1.0)
    g = jax.tree.map(lambda x: x / n, g)
    updates, opt_state = tx.update(g, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss_sum / n, optax.tree.norm(g)

  if shardings is None:
    return jax.jit(step, donate_argnums=(0, 1))
  replicated = jax.sharding.NamedSharding(jax.tree.leaves(shardings)[0].mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, donate_argnums=(0, 1), out_shardings=(*shardings, replicated, replicated))


def make_eval(forward):
  token_loss = token_loss_fn(forward, remat=False)

  @jax.jit
  def eval_batch(adapters, frozen, mb):
    return token_loss(adapters, frozen, mb, None)

  def evaluate(adapters, frozen, tokenized: data_lib.Tokenized, batch_size: int) -> float:
    total = count = 0.0
    for s in range(0, len(tokenized), batch_size):
      sl = slice(s, s + batch_size)
      mb = {"ids": tokenized.ids[sl], "loss_mask": tokenized.loss_mask[sl],
            "attention_mask": tokenized.attention_mask[sl]}
      short = batch_size - mb["ids"].shape[0]
      if short:  # pad with rows that carry no loss, to keep one compiled shape
        mb = {k: np.concatenate([v, np.zeros((short, v.shape[1]), v.dtype)]) for k, v in mb.items()}
      l, n = eval_batch(adapters, frozen, mb)
      total += float(l)
      count += float(n)
    return total / max(count, 1.0)

  return evaluate


def exact_match(loaded, params, records: list[data_lib.Record], *, chat_template: bool,
                max_new_tokens: int) -> tuple[float, list[dict]]:
  """Share of records whose greedy completion equals the reference (whitespace-stripped)."""
  tok = loaded.tokenizer
  prompts = []
  for r in records:
    ids, mask = data_lib.encode(tok, r, chat_template=chat_template)
    prompts.append(ids[: mask.index(1)])
  outs = loaded.generate(params, prompts, max_new_tokens=max_new_tokens)
  rows = []
  for r, o in zip(records, outs):
    text = tok.decode(o, skip_special_tokens=True)
    rows.append({"prompt": r.prompt, "target": r.completion, "output": text,
                 "match": text.strip() == r.completion.strip()})
  return float(np.mean([row["match"] for row in rows])), rows


def _dir_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for f in files:
      total += os.path.getsize(os.path.join(root, f))
  return total


def _export_peft(directory: str, lora_params, loaded, base: str, say, *, base_fingerprint: str,
                 **kwargs) -> str | None:
  """The adapter in Hugging Face PEFT format too (for PyTorch PEFT / vLLM), when expressible."""
  from jlora import peft as peft_lib

  try:
    return peft_lib.save(directory, lora_params, base_model_name_or_path=base, module_map=loaded.module_map,
                         base_fingerprint=base_fingerprint, **kwargs)
  except (ValueError, peft_lib.PeftFormatError) as e:
    say(f"PEFT export skipped: {e}")
    return None


class _Preemption:
  """Turns SIGTERM (what TPU/Kubernetes preemption sends) into a flag checked between steps."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    if hasattr(signal, "SIGTERM"):
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def run(cfg: TrainConfig, *, resume: bool = True, overwrite: bool = False) -> dict[str, Any]:
  """Runs a fine-tuning job; returns the summary also written to output_dir/summary.json.

  Args:
    cfg: the options.
    resume: continue from the newest readable checkpoint in ``output_dir``; if
      False, an ``output_dir`` that holds checkpoints is refused.
    overwrite: start fresh, deleting what an earlier run wrote to ``output_dir``
      (only once this run's model, data and adapters are set up).

  Raises:
    jlora.finetune.cli.UserError: bad data, model directory, targets or output
      directory (before any training; the message names the option to fix).
  """
  from jlora.finetune import distributed, numerics

  reproducible = numerics.pin() if cfg.reproducible else "not pinned: --no-reproducible"
  if cfg.reproducible and reproducible.startswith("not"):
    print(f"numerics: {reproducible}", flush=True)
  distributed.initialize(cfg)
  out = os.path.abspath(cfg.output_dir)
  rundir.check(out, resume=resume and not overwrite, overwrite=overwrite)
  with rundir.removed_on_failure(out) as state:
    return _run(cfg, out, resume=resume and not overwrite, overwrite=overwrite, state=state,
                numerics=reproducible)


def _load_model(cfg: TrainConfig, mesh=None) -> model_lib.LoadedModel:
  where = f"--model {cfg.model!r}" if cfg.model else f"the bundled model {cfg.model_dir!r}"
  if not os.path.isdir(cfg.model_dir):
    raise UserError(f"{where} is not a directory; give a local Hugging Face model directory (config.json "
                    "and weights)")
  if not os.path.exists(os.path.join(cfg.model_dir, "config.json")):
    raise UserError(f"{where} has no config.json; give a Hugging Face model directory")
  try:
    return model_lib.load(cfg.model_dir, bf16=cfg.bf16, remat=cfg.remat,
                          model_id=cfg.model or "jlora/tiny-base (bundled)", mesh=mesh, sharding=cfg.sharding)
  except FileNotFoundError as e:  # the loader's "no weights" (or a tokenizer file missing)
    raise UserError(f"{where}: {e}") from None
  except (jlora.models.CheckpointError, hf_flax.MissingWeightsError) as e:  # weights missing: never train on
    raise UserError(str(e) if str(e).startswith("--model") else f"{where}: {e}") from None


def _module_names(layout) -> list[str]:
  """Names of the modules whose kernels the model multiplies with (what --targets can list)."""
  return sorted({p.split("/")[-2] for p, lay in layout.items() if p.endswith("/kernel") and not lay.embedding
                 and "/" in p})


def _lora_config(cfg: TrainConfig, base_params, layout, loaded: model_lib.LoadedModel) -> jlora.LoraConfig:
  """The LoRA options as a ``jlora.LoraConfig`` for this model, or a ``UserError`` naming the option."""
  model_id = loaded.model_id
  try:
    targets = loaded.resolve_targets(cfg.targets)
    lora_cfg = jlora.LoraConfig(rank=cfg.rank, alpha=cfg.alpha, rslora=cfg.rslora, dropout=cfg.lora_dropout,
                                targets=targets, exclude=cfg.exclude or (), **variants.lora_config_kwargs(cfg))
  except ValueError as e:  # jlora's checks of the options (user input)
    raise UserError(f"--targets {cfg.targets!r} on {model_id}: {e}") from None
  matched = [path for path, _ in leaves_with_paths(base_params, is_leaf=is_lazy_node) if re.fullmatch(targets, path)]
  if matched and cfg.exclude and all(re.fullmatch(cfg.exclude, path) for path in matched):
    raise UserError(f"--exclude {cfg.exclude!r} removes all {len(matched)} parameters --targets {cfg.targets!r} "
                    f"selects (e.g. {matched[0]!r}); narrow --exclude")
  if not matched:
    shown = f" (the regex {targets!r})" if targets != cfg.targets else ""
    raise UserError(f"--targets {cfg.targets!r}{shown} matches no parameter of {model_id}; use all-linear, "
                    f"module names of this model ({','.join(_module_names(layout))}) or a regex (fullmatch) on "
                    f"its '/'-joined parameter paths such as "
                    f"{next((p for p, lay in layout.items() if not lay.embedding), '')!r}")
  return lora_cfg


def _init_adapters(cfg: TrainConfig, base_params, lora_cfg, layout, mesh, model_id: str):
  from jlora.finetune import distributed

  try:
    return distributed.init_adapters(jax.random.key(cfg.seed), base_params, lora_cfg, layout, mesh,
                                     from_values=variants.needs_base_values(lora_cfg))
  except ValueError as e:  # jlora.init's checks of the options against this model (user input)
    raise UserError(f"LoRA options (--targets {cfg.targets!r}, --exclude {cfg.exclude!r}, --rank {cfg.rank}) "
                    f"on {model_id}: {e}") from None


def _run(cfg: TrainConfig, out: str, *, resume: bool, overwrite: bool, state: dict, numerics: str
         ) -> dict[str, Any]:
  from jlora.finetune import distributed

  main_process = jax.process_index() == 0
  say = (lambda *a: print(*a, flush=True)) if main_process else (lambda *a: None)
  t_start = time.time()

  # Everything a user can get wrong is checked first, cheapest first, and nothing is written yet.
  records, skipped = data_lib.load_records(cfg.data_path, skip_bad_lines=cfg.skip_bad_lines)
  if cfg.eval_path:
    eval_records, _ = data_lib.load_records(cfg.eval_path, skip_bad_lines=cfg.skip_bad_lines,
                                            option="--eval-data")
  mesh = distributed.make_mesh(cfg)
  loaded = _load_model(cfg, mesh)
  tok = loaded.tokenizer
  if not loaded.native:
    say(f"model: {loaded.model_type!r} is not a native jlora.models family; running transformers' Flax class"
        + (" (--pack: attention crosses example boundaries)" if cfg.pack else ""))
  if skipped:
    say(f"data: skipped {skipped} malformed lines of {cfg.data_path}")
  if not cfg.eval_path:
    order = np.random.default_rng(cfg.seed).permutation(len(records))
    n_eval = max(1, int(len(records) * cfg.eval_fraction))
    eval_records = [records[i] for i in order[:n_eval]]
    records = [records[i] for i in order[n_eval:]]
  train_tok = data_lib.tokenize(records, tok, max_len=cfg.max_seq_len, pack=cfg.pack,
                                chat_template=cfg.chat_template)
  eval_tok = data_lib.tokenize(eval_records, tok, max_len=cfg.max_seq_len, chat_template=cfg.chat_template)
  if train_tok.truncated:
    say(f"data: {train_tok.truncated} training examples truncated to max_seq_len={cfg.max_seq_len}")

  # Native parameters were placed on the mesh while loading; legacy ones are placed now.
  base_params = loaded.params if loaded.native else distributed.place(loaded.params, cfg, mesh)
  layout = loaded.layout
  # QLoRA (--quantize, or a *-bnb-4bit --model): the linear kernels as 4-bit NF4Weights from here on.
  base_params, quantization = quantize_lib.quantize_base(cfg, base_params, layout, mesh, model_id=loaded.model_id)
  loaded.params = base_params  # (no reference to a dense copy is kept)
  if quantization:
    say(f"base: linear kernels in 4 bits ({quantization['quant_type']}, blocksize {quantization['blocksize']}, "
        f"double_quant {str(quantization['double_quant']).lower()}: {quantization['bits_per_parameter']} bits "
        f"per weight; from {quantization['source']})")
  lora_cfg = _lora_config(cfg, base_params, layout, loaded)
  lora_params = _init_adapters(cfg, base_params, lora_cfg, layout, mesh, loaded.model_id)
  counts = jlora.count(lora_params)
  say(f"model: {loaded.model_id} | {counts}")
  adapters, frozen = jlora.split(lora_params)
  del lora_params

  batches = data_lib.Batches(train_tok, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                             seed=cfg.seed, process_index=jax.process_index(),
                             process_count=jax.process_count())
  total = cfg.steps or max(1, int(round(cfg.epochs * batches.steps_per_epoch)))
  try:
    tx = variants.optimizer(cfg, make_optimizer(cfg, total), adapters, total)
  except ValueError as e:  # AdaLoRA's schedule against this run's length
    raise UserError(f"--adalora-* options with {total} steps: {e}") from None
  if cfg.memory_report:
    say(variants.memory_table(cfg, loaded.forward, base_params, lora_cfg, layout, make_optimizer(cfg, total)))
  opt_state = tx.init(adapters)
  rng = jax.random.key(cfg.seed)
  fp = ck.fingerprint(base_params)
  run_info = {"base_model_dir": os.path.abspath(cfg.model_dir), "lora_config": lora_cfg.to_dict(),
              "train_config": cfg.to_dict()}
  if quantization:  # how the adapter was trained; the fingerprint is the unquantized base's all the same
    run_info["base_quantization"] = quantization
  meta = ck.adapter_metadata(adapters, base_model=loaded.model_id, base_fingerprint=fp, extra=run_info)

  # Setup succeeded: only now is the output directory touched.
  if overwrite and main_process:
    removed = rundir.clear(out)
    if removed:
      say(f"--overwrite: deleted the earlier run's {', '.join(removed)} in {out}")
  if overwrite and jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("jlora-finetune overwrite")
  os.makedirs(out, exist_ok=True)
  ckpt = TrainCheckpointer(os.path.join(out, rundir.CHECKPOINTS), keep=cfg.keep_checkpoints,
                           save_every=cfg.save_every)
  start = 0
  if resume:
    restored = ckpt.restore_newest_readable(say=say, base_params=base_params, adapters_template=adapters,
                                            opt_state_template=opt_state, rng_template=rng)
    if restored is not None:
      start, (adapters, opt_state, rng, _) = restored
      if start > total:
        raise UserError(f"{ckpt.directory}/{start} is past this run's last step ({total}); rerun with the "
                        f"--steps/--epochs it was started with, or {START_FRESH}")
      say(f"resumed from {ckpt.directory}/{start} (step {start} of {total})")

  (adapters, opt_state), shardings = distributed.pinned((adapters, opt_state), mesh)
  evaluate = make_eval(loaded.forward)
  n_em = len(eval_records) if cfg.eval_exact_match == 0 else max(cfg.eval_exact_match, 0)
  em_records = eval_records[:n_em]
  baseline_path = os.path.join(out, "baseline.json")
  if start == 0 or not os.path.exists(baseline_path):
    before = {"eval_loss": evaluate(adapters, frozen, eval_tok, cfg.batch_size)}
    if em_records:
      host_base = distributed.gather(base_params)  # collective; generation runs on process 0 only
      if main_process:
        before["exact_match"], _ = exact_match(loaded, host_base, em_records, chat_template=cfg.chat_template,
                                               max_new_tokens=cfg.max_new_tokens)
      del host_base
    if main_process:
      with open(baseline_path, "w") as f:
        json.dump(before, f)
  else:
    with open(baseline_path) as f:
      before = json.load(f)
  say("before training: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))

  step_fn = make_train_step(loaded.forward, tx, remat=cfg.remat and not loaded.native,
                            use_dropout=cfg.lora_dropout > 0, regularizer=variants.regularizer(cfg),
                            shardings=shardings)
  state["started"] = True  # from here on a failure keeps the output directory
  log = MetricsLog(os.path.join(out, "metrics.jsonl"), enabled=main_process)
  log.truncate_after(start)
  bar = None
  if cfg.progress and main_process:
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc="lora", dynamic_ncols=True, file=sys.stdout)
  tokens_since, t_last, last_eval = 0, time.time(), None
  with _Preemption() as preempt:
    for step in range(start, total):
      local = batches.get(step)
      batch = distributed.global_batch(local, mesh)
      tokens_since += int(local["attention_mask"].sum()) * jax.process_count()
      adapters, opt_state, loss, gnorm = step_fn(adapters, opt_state, frozen, batch, jax.random.fold_in(rng, step))
      done = step + 1
      if done % cfg.log_every == 0 or done == total:
        loss_v = float(loss)
        dt = max(time.time() - t_last, 1e-9)
        entry = {"step": done, "loss": loss_v, "grad_norm": float(gnorm), "tokens_per_s": tokens_since / dt}
        if done % cfg.eval_every == 0 or done == total:
          last_eval = evaluate(adapters, frozen, eval_tok, cfg.batch_size)
          entry["eval_loss"] = last_eval
        log.log(**entry)
        if bar is not None:
          bar.set_postfix(loss=f"{loss_v:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}",
                          **({"eval": f"{last_eval:.4f}"} if last_eval is not None else {}))
        tokens_since, t_last = 0, time.time()
      if bar is not None:
        bar.update(1)
      ckpt.save(done, adapters=adapters, opt_state=opt_state, rng=rng, meta=meta,
                force=preempt.requested or done == total)
      if preempt.requested and done < total:
        ckpt.wait()
        if bar is not None:
          bar.close()
        say(f"SIGTERM: saved checkpoint at step {done}; rerun the same command to resume.")
        sys.exit(PREEMPTED_EXIT_CODE)
  if bar is not None:
    bar.close()
  ckpt.wait()

  # AdaLoRA's final rank pattern; PiSSA/OLoRA/LoftQ adapters as adapters of the original base.
  trained = variants.finalize(cfg, jlora.combine(adapters, frozen), opt_state)
  lp = variants.reloadable(trained, base_params)
  adapter_dir = os.path.join(out, "adapter")
  # Orbax writes collectively: every process calls this with the global (sharded) arrays.
  jlora.save_adapter(adapter_dir, lp, base_model=loaded.model_id, base_fingerprint=fp,
                     extra={**run_info, "step": total})
  after = {"eval_loss": evaluate(*jlora.split(trained), eval_tok, cfg.batch_size)}
  host_lp = distributed.gather(lp)  # collective; what follows is process 0's
  examples = []
  if em_records and main_process:
    after["exact_match"], examples = exact_match(loaded, jlora.merge(host_lp), em_records,
                                                 chat_template=cfg.chat_template, max_new_tokens=cfg.max_new_tokens)
  summary = {
      "model": loaded.model_id, "data": cfg.data_path, "steps": total,
      "trainable_params": counts.trainable, "total_params": counts.total,
      "before": before, "after": after,
      "adapter_dir": adapter_dir,
      "adapter_checkpoint_bytes": _dir_bytes(adapter_dir) if main_process else None,
      "base_model_bytes": model_lib.base_bytes(base_params),
      "numerics": numerics,
      "seconds": time.time() - t_start,
  }
  if quantization:
    summary["base_quantization"] = quantization
  if main_process:
    plot_loss(log.read(), os.path.join(out, "loss_curve.png"))
    with open(os.path.join(out, "eval_examples.jsonl"), "w") as f:
      for row in examples:
        f.write(json.dumps(row) + "\n")
    summary["peft_dir"] = _export_peft(os.path.join(out, "peft"), host_lp, loaded,
                                       cfg.model or os.path.abspath(cfg.model_dir), say, base_fingerprint=fp,
                                       **variants.peft_kwargs(cfg, total))
    if cfg.save_merged:
      merged_dir = os.path.join(out, "merged")
      loaded.save_pretrained(merged_dir, jlora.merge(host_lp))  # HF safetensors (+ tokenizer)
      summary["merged_dir"] = merged_dir
    with open(os.path.join(out, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  say("after training:  " + ", ".join(f"{k} {v:.4f}" for k, v in after.items()))
  if summary["adapter_checkpoint_bytes"]:
    say(f"adapter checkpoint: {summary['adapter_checkpoint_bytes'] / 2**20:.2f} MiB vs base model "
        f"{summary['base_model_bytes'] / 2**20:.2f} MiB "
        f"({100 * summary['adapter_checkpoint_bytes'] / summary['base_model_bytes']:.1f}%)")
  say(f"wrote {out} in {summary['seconds']:.0f}s")
  return summary

