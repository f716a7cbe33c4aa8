"""The LoRA-family options of a run in one place: DoRA, PiSSA/OLoRA/LoftQ, AdaLoRA and LoRA+.

``--dora``, ``--init pissa|pissa_niter_K|olora|loftq``, ``--adalora-target-rank`` (with
``--adalora-tinit/-tfinal/-delta-t/-orth-reg``) and ``--loraplus-ratio`` change a run at
five points, all answered by one ``VariantPolicy``:

* setup: the ``LoraConfig`` (``lora_config``), whether creating the adapters reads the
  base (``needs_base_values``) and the optimizer (``optimizer``);
* the train step: a term added to the loss (``regularizer``: AdaLoRA's orthogonality);
* finish: the adapter that is saved (``finalize``: AdaLoRA's final rank pattern;
  ``reloadable``: PiSSA/OLoRA/LoftQ as a plain LoRA of the original base) and the PEFT
  export's extra options (``peft_kwargs``).

The stages never test for a variant themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

import jlora
from jlora.finetune.options import LoraOptions
from jlora.variants import AdaLoRA, Residual

Params = Any


@dataclasses.dataclass(frozen=True)
class VariantPolicy:
  """What the LoRA-family options change in a run.

  Example:
    >>> from jlora.finetune import TrainConfig
    >>> from jlora.finetune.options import LoraOptions, group
    >>> policy = VariantPolicy(group(TrainConfig(adalora_target_rank=2, rank=4), LoraOptions))
    >>> policy.adalora, policy.lora_config("q_proj").variant.name
    (True, 'adalora')
  """

  options: LoraOptions

  @property
  def adalora(self) -> bool:
    return self.options.adalora_target_rank > 0

  def lora_config(self, targets: str) -> jlora.LoraConfig:
    """The ``LoraConfig`` of the run, for the (already expanded) ``targets`` regex.

    Raises:
      ValueError: an option jlora refuses (the caller names the flags).
    """
    o = self.options
    kw: dict[str, Any] = {"init": o.init, "dora": o.dora}
    if self.adalora:
      kw["variant"] = AdaLoRA()
      if o.init == "default":
        kw["init"] = "adalora"
    return jlora.LoraConfig(rank=o.rank, alpha=o.alpha, rslora=o.rslora, dropout=o.lora_dropout, targets=targets,
                            exclude=o.exclude or (), **kw)

  @staticmethod
  def needs_base_values(lora_cfg: jlora.LoraConfig) -> bool:
    """Whether creating the adapters reads the base weights (DoRA's norm, PiSSA's SVD, LoftQ...)."""
    return lora_cfg.variant.name == "dora" or lora_cfg.init not in ("default", "gaussian", "adalora")

  def optimizer(self, inner: optax.GradientTransformation, adapters: Params, total_steps: int
                ) -> optax.GradientTransformation:
    """``jlora.optimizer`` with AdaLoRA's rank allocator and LoRA+ when asked for.

    Raises:
      ValueError: AdaLoRA's schedule does not fit ``total_steps``.
    """
    o = self.options
    if self.adalora:
      inner = jlora.adalora(inner, target_rank=o.adalora_target_rank, total_steps=total_steps,
                            tinit=o.adalora_tinit, tfinal=o.adalora_tfinal, delta_t=o.adalora_delta_t)
    return jlora.optimizer(inner, adapters, loraplus_ratio=o.loraplus_ratio or None)

  def regularizer(self) -> Callable[[Params], jax.Array] | None:
    """AdaLoRA's orthogonality term (added to the mean loss), or None."""
    if not self.adalora or self.options.adalora_orth_reg == 0:
      return None
    weight = float(self.options.adalora_orth_reg)
    return lambda adapters: weight * jlora.orthogonality_penalty(adapters)

  def finalize(self, lora_params: Params, opt_state: Any) -> Params:
    """AdaLoRA: the allocator's final rank pattern written into the adapters."""
    return jlora.adalora_finalize(lora_params, opt_state) if self.adalora else lora_params

  @staticmethod
  def reloadable(lora_params: Params, base_params: Params) -> Params:
    """The adapter to save: PiSSA/OLoRA/LoftQ adapters as a plain rank-2r LoRA on the original base."""
    is_lw = lambda x: isinstance(x, jlora.LoraWeight)  # noqa: E731
    residual = any(is_lw(x) and isinstance(x.spec.variant, Residual)
                   for x in jax.tree.leaves(lora_params, is_leaf=is_lw))
    return jlora.to_lora(lora_params, base=base_params) if residual else lora_params

  def peft_kwargs(self, total_steps: int) -> dict[str, Any]:
    """Extra ``jlora.peft.save`` options (AdaLoRA's budget schedule)."""
    if not self.adalora:
      return {}
    o = self.options
    return {"adalora_config": {"target_r": o.adalora_target_rank, "total_step": total_steps,
                               "tinit": o.adalora_tinit, "tfinal": o.adalora_tfinal,
                               "deltaT": o.adalora_delta_t, "orth_reg_weight": o.adalora_orth_reg}}

  @staticmethod
  def plain(lora_cfg: jlora.LoraConfig) -> jlora.LoraConfig:
    """The same targets, rank and alpha as plain LoRA (what the memory report compares against)."""
    if lora_cfg.variant.name == "lora":
      return lora_cfg
    return jlora.LoraConfig(rank=lora_cfg.rank, alpha=lora_cfg.alpha, rslora=lora_cfg.rslora,
                            targets=lora_cfg.targets, exclude=lora_cfg.exclude)
