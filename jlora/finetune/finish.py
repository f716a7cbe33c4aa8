"""Stage 3 of a run: the adapter saved, evaluated and exported, and the summary written."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jlora
from jlora import peft as peft_lib
from jlora.finetune import distributed
from jlora.finetune import loop as loop_lib
from jlora.finetune import model as model_lib
from jlora.finetune.metrics import MetricsLog, plot_loss
from jlora.finetune.options import OutputOptions
from jlora.finetune.setup import Run


def _dir_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for f in files:
      total += os.path.getsize(os.path.join(root, f))
  return total


def _export_peft(directory: str, lora_params, run: Run, base: str, say, **kwargs) -> str | None:
  """The adapter in Hugging Face PEFT format too (for PyTorch PEFT / vLLM), when expressible.

  Fused 3-D experts (gpt-oss) are written in the layout PEFT 0.21 on transformers 4.x reads
  (``fused_layout="peft_swapped"``, recorded in the file); vLLM and transformers 5 read
  ``"input_side"``, which ``jlora.peft.save`` writes from the same adapter (docs/moe.md).
  """
  fused = run.loaded.module_map.fused_experts
  if fused and any(run.loaded.module_map.is_fused(p) for p in jlora._checkpoint.adapter_weights(lora_params)):
    kwargs = {**kwargs, "fused_layout": "peft_swapped"}
    say("PEFT export: fused experts in PEFT 0.21's layout for transformers 4.x (fused_layout 'peft_swapped'); "
        "for vLLM or transformers 5 write fused_layout='input_side' with jlora.peft.save")
  try:
    return peft_lib.save(directory, lora_params, base_model_name_or_path=base, module_map=run.loaded.module_map,
                         base_fingerprint=run.fingerprint, **kwargs)
  except (ValueError, peft_lib.PeftFormatError) as e:
    say(f"PEFT export skipped: {e}")
    return None


def finish(run: Run, adapters: Any, opt_state: Any, *, before: dict[str, float], output: OutputOptions,
           base_model: str, numerics: str, t_start: float, say: Callable[[str], None]) -> dict[str, Any]:
  """Stage 3: the final adapter (``adapter/``, ``peft/``, ``merged/``), its metrics and ``summary.json``.

  Args:
    run: what setup made.
    adapters, opt_state: the loop's result.
    before: the metrics before training.
    output: where and what to write.
    base_model: how the PEFT export names the base (the ``--model`` given, else its path).
    numerics: what ``--reproducible`` did, in words.
    t_start: when the run started (``time.time()``).
    say: prints on the main process.

  Returns:
    The summary, also written to ``summary.json``.
  """
  out, task, policy = run.out, run.task, run.policy
  # AdaLoRA's final rank pattern; PiSSA/OLoRA/LoftQ adapters as adapters of the original base.
  trained = policy.finalize(jlora.combine(adapters, run.frozen), opt_state)
  lp = policy.reloadable(trained, run.base_params)
  adapter_dir = os.path.join(out, "adapter")
  # Orbax writes collectively: every process calls this with the global (sharded) arrays.
  jlora.save_adapter(adapter_dir, lp, base_model=run.loaded.model_id, base_fingerprint=run.fingerprint,
                     extra={**run.run_info, "step": run.total})
  after = task.evaluate(trained)
  host_lp = distributed.gather(lp)  # collective; what follows is process 0's
  examples = []
  if run.main_process:
    gen, examples = task.generation_eval(jlora.merge(host_lp))
    after.update(gen)
  summary = {
      "model": run.loaded.model_id, **task.describe(), "steps": run.total,
      "trainable_params": run.counts.trainable, "total_params": run.counts.total,
      "before": before, "after": after,
      "adapter_dir": adapter_dir,
      "adapter_checkpoint_bytes": _dir_bytes(adapter_dir) if run.main_process else None,
      "base_model_bytes": model_lib.base_bytes(run.base_params),
      "numerics": numerics,
      "seconds": time.time() - t_start,
  }
  if run.quantization:
    summary["base_quantization"] = run.quantization
  if run.main_process:
    plot_loss(MetricsLog(os.path.join(out, "metrics.jsonl")).read(), os.path.join(out, "loss_curve.png"))
    with open(os.path.join(out, "eval_examples.jsonl"), "w") as f:
      for row in examples:
        f.write(json.dumps(row) + "\n")
    summary["peft_dir"] = _export_peft(os.path.join(out, "peft"), host_lp, run, base_model, say,
                                       **policy.peft_kwargs(run.total))
    if output.save_merged:
      merged_dir = os.path.join(out, "merged")
      run.loaded.save_pretrained(merged_dir, jlora.merge(host_lp))  # HF safetensors (+ tokenizer)
      summary["merged_dir"] = merged_dir
    with open(os.path.join(out, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  say("after training:  " + loop_lib.line(loop_lib.shown(task, after)))
  if summary["adapter_checkpoint_bytes"]:
    say(f"adapter checkpoint: {summary['adapter_checkpoint_bytes'] / 2**20:.2f} MiB vs base model "
        f"{summary['base_model_bytes'] / 2**20:.2f} MiB "
        f"({100 * summary['adapter_checkpoint_bytes'] / summary['base_model_bytes']:.1f}%)")
  say(f"wrote {out} in {summary['seconds']:.0f}s")
  return summary
