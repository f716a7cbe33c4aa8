"""The fine-tuning command's LoRA-family options, kept out of the training loop's way.

``--dora``, ``--init pissa|pissa_niter_K|olora|loftq``, ``--adalora-target-rank`` (with
``--adalora-tinit/-tfinal/-delta-t/-orth-reg``), ``--loraplus-ratio`` and
``--memory-report`` each map to one of the functions below, which the loop in
``train.py`` calls at fixed points: building the ``LoraConfig``, the optimizer and the
loss, and after training (finalising AdaLoRA's rank pattern, saving an adapter that
loads onto the original base, exporting to PEFT).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jlora
from jlora.variants import AdaLoRA, Residual

Params = Any


def adalora_on(cfg) -> bool:
  return cfg.adalora_target_rank > 0


def lora_config_kwargs(cfg) -> dict[str, Any]:
  """``LoraConfig`` fields for the variant options."""
  kw: dict[str, Any] = {"init": cfg.init, "dora": cfg.dora}
  if adalora_on(cfg):
    kw["variant"] = AdaLoRA()
    if cfg.init == "default":
      kw["init"] = "adalora"
  return kw


def needs_base_values(lora_cfg: jlora.LoraConfig) -> bool:
  """Whether creating the adapters reads the base weights (DoRA's norm, PiSSA's SVD, LoftQ...)."""
  return lora_cfg.variant.name == "dora" or lora_cfg.init not in ("default", "gaussian", "adalora")


def optimizer(cfg, inner: optax.GradientTransformation, adapters: Params, total_steps: int
              ) -> optax.GradientTransformation:
  """``jlora.optimizer`` with AdaLoRA's rank allocator and LoRA+ when asked for."""
  if adalora_on(cfg):
    inner = jlora.adalora(inner, target_rank=cfg.adalora_target_rank, total_steps=total_steps,
                          tinit=cfg.adalora_tinit, tfinal=cfg.adalora_tfinal, delta_t=cfg.adalora_delta_t)
  return jlora.optimizer(inner, adapters, loraplus_ratio=cfg.loraplus_ratio or None)


def regularizer(cfg) -> Callable[[Params], jax.Array] | None:
  """AdaLoRA's orthogonality term (added to the per-token loss), or None."""
  if not adalora_on(cfg) or cfg.adalora_orth_reg == 0:
    return None
  weight = float(cfg.adalora_orth_reg)
  return lambda adapters: weight * jlora.orthogonality_penalty(adapters)


def finalize(cfg, lora_params: Params, opt_state: Any) -> Params:
  """AdaLoRA: the allocator's final rank pattern written into the adapters."""
  return jlora.adalora_finalize(lora_params, opt_state) if adalora_on(cfg) else lora_params


def reloadable(lora_params: Params, base_params: Params) -> Params:
  """The adapter to save: PiSSA/OLoRA adapters as plain rank-2r LoRA on the original base."""
  has_residual = any(isinstance(x, jlora.LoraWeight) and isinstance(x.spec.variant, Residual)
                     for x in jax.tree.leaves(lora_params, is_leaf=lambda x: isinstance(x, jlora.LoraWeight)))
  return jlora.to_lora(lora_params, base=base_params) if has_residual else lora_params


def peft_kwargs(cfg, total_steps: int) -> dict[str, Any]:
  if not adalora_on(cfg):
    return {}
  return {"adalora_config": {"target_r": cfg.adalora_target_rank, "total_step": total_steps,
                             "tinit": cfg.adalora_tinit, "tfinal": cfg.adalora_tfinal,
                             "deltaT": cfg.adalora_delta_t, "orth_reg_weight": cfg.adalora_orth_reg}}


def memory_table(cfg, forward, base_params: Params, lora_cfg: jlora.LoraConfig, layout, inner) -> str:
  """Full fine-tuning, LoRA, DoRA (and QLoRA) of this run's model, batch and optimizer, from shapes."""
  from jlora.memory import compare, format_table

  def loss(params, ids):
    logits = forward(params, ids, jnp.ones_like(ids))[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base_params)
  batch = jax.ShapeDtypeStruct((cfg.batch_size, cfg.max_seq_len), jnp.int32)
  plain = lora_cfg if lora_cfg.variant.name == "lora" else jlora.LoraConfig(
      rank=lora_cfg.rank, alpha=lora_cfg.alpha, rslora=lora_cfg.rslora, targets=lora_cfg.targets,
      exclude=lora_cfg.exclude)
  methods = ("full", "lora", "dora", "qlora")
  reports, skipped = compare(loss, shapes, batch, config=plain, methods=methods, optimizer=inner, layout=layout)
  lines = [f"memory per train step (XLA compile-time analysis; batch {cfg.batch_size}x{cfg.max_seq_len}, "
           f"one micro-batch):", format_table(reports)]
  lines += [f"{name}: skipped ({why})" for name, why in skipped.items()]
  return "\n".join(lines)
