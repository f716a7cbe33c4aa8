"""Log-probabilities of a batch under a wrapped model: the policy (adapters on) and the reference (off).

The model is anything with ``hidden_states(params, input_ids, *, attention_mask=...)`` and
``head(params)`` (a ``jlora.models.Decoder``). The policy pass runs
``jlora.wrap(model.hidden_states)`` on the LoRA tree; the reference pass runs it on
``jax.lax.stop_gradient(jlora.unload(params))``: the same base arrays (no second copy of the
model), adapters dropped, nothing differentiated, so the reference pass keeps no activations
for the backward pass and its head runs without the gradient work (``token_logprobs``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jlora._apply.wrap import wrap
from jlora._merge import unload
from jlora.objectives._logprobs import next_token_labels, token_logprobs

Params = Any
Batch = dict[str, jax.Array]


def model_token_logprobs(model: Any, params: Params, input_ids: jax.Array, mask: jax.Array, *,
                         attention_mask: jax.Array | None = None, reference: bool = False, chunk_size: int = 1024,
                         temperature: float = 1.0, lora_rng: jax.Array | None = None) -> jax.Array:
  """Token log-probs of ``input_ids`` under the model: position ``t`` scores ``input_ids[:, t + 1]``.

  Args:
    model: has ``hidden_states`` and ``head`` (a ``jlora.models.Decoder``).
    params: the LoRA tree (``jlora.init`` / ``jlora.combine``) or a plain base tree.
    input_ids: ``(N, T)`` token ids.
    mask: ``(N, T)`` tokens to score (completion mask, or the attention mask for every real
      token); the logits are computed only at the positions that predict them.
    attention_mask: ``(N, T)``, 1 for real tokens (default: all).
    reference: adapters off (``jlora.unload``) and under ``jax.lax.stop_gradient``.
    chunk_size: positions per block of logits (``token_logprobs``).
    temperature: the logits are divided by it.
    lora_rng: LoRA dropout key for the policy pass (ignored with ``reference``).

  Returns:
    float32 ``(N, T)``, 0 where nothing is scored (the last column always).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from jlora.models import Decoder, ModelConfig
    >>> from jlora.objectives import model_token_logprobs
    >>> model = Decoder(ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
    ...   "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}))
    >>> lp = jlora.init(jax.random.key(0), model.init(jax.random.key(1)),
    ...                 jlora.LoraConfig(rank=2, targets=model.targets("all-linear")), layout=model.layout)
    >>> ids, mask = jnp.array([[1, 2, 3, 4]]), jnp.array([[0, 0, 1, 1]])
    >>> f = jax.jit(model_token_logprobs, static_argnums=0, static_argnames="reference")
    >>> pol, ref = f(model, lp, ids, mask), f(model, lp, ids, mask, reference=True)
    >>> pol.shape, bool((pol == ref).all())  # B = 0 after init: the policy is the reference
    ((1, 4), True)
  """
  labels = next_token_labels(input_ids, mask)
  kwargs = {}
  if reference:
    params = jax.lax.stop_gradient(unload(params))
  elif lora_rng is not None:
    kwargs["lora_rng"] = lora_rng
  hidden = wrap(model.hidden_states)(params, input_ids, attention_mask=attention_mask, **kwargs)
  out = token_logprobs(hidden, model.head(params), labels, chunk_size=chunk_size, temperature=temperature)
  return jax.lax.stop_gradient(out) if reference else out


class PreferenceLogps(NamedTuple):
  """Per-pair log-probs of a ``[chosen; rejected]`` batch (``preference_logps``); a pytree."""

  chosen: jax.Array  # (B,) summed completion log-probs of the chosen responses (policy)
  rejected: jax.Array  # (B,) the same for the rejected responses
  chosen_counts: jax.Array  # (B,) completion tokens scored (a sequence's first token is never scored)
  rejected_counts: jax.Array  # (B,)
  ref_chosen: jax.Array | None = None  # (B,) the reference's (adapters off, no gradient); None if not asked
  ref_rejected: jax.Array | None = None
  nll_logps: jax.Array | None = None  # (B,) chosen rows over every real token (ORPO's NLL); None if not asked
  nll_counts: jax.Array | None = None

  @property
  def chosen_mean(self) -> jax.Array:
    """Length-normalised ``chosen`` (SimPO, ORPO); empty completions count as one token."""
    return self.chosen / jnp.maximum(self.chosen_counts, 1).astype(self.chosen.dtype)

  @property
  def rejected_mean(self) -> jax.Array:
    """Length-normalised ``rejected``."""
    return self.rejected / jnp.maximum(self.rejected_counts, 1).astype(self.rejected.dtype)


def _check_batch(fn: str, batch: Batch, keys: tuple[str, ...]) -> None:
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ValueError(f"{fn}: batch lacks {missing}; expected {list(keys)} as TRL's collators name them.")
  shape = jnp.shape(batch[keys[0]])
  bad = {k: jnp.shape(batch[k]) for k in keys if jnp.shape(batch[k]) != shape}
  if len(shape) != 2 or bad:
    raise ValueError(f"{fn}: {list(keys)} must all be (rows, length); got {keys[0]} {shape} and {bad or 'nothing else'}.")


def preference_logps(model: Any, params: Params, batch: Batch, *, reference: bool = True, nll: bool = False,
                     chunk_size: int = 1024, temperature: float = 1.0,
                     lora_rng: jax.Array | None = None) -> PreferenceLogps:
  """Summed completion log-probs of a preference batch: one policy pass and one reference pass.

  ``batch`` holds TRL's ``DataCollatorForPreference`` arrays: ``input_ids``, ``attention_mask``
  and ``completion_mask``, ``(2B, T)``, the B chosen sequences (prompt + chosen) first, then
  the B rejected ones in the same order. Only completion positions are scored (plus every
  real position of the chosen rows with ``nll``, in the same pass).

  For the losses: ``dpo_loss(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected,
  chosen_counts=p.chosen_counts, rejected_counts=p.rejected_counts)``;
  ``simpo_loss(p.chosen, p.rejected, p.chosen_counts, p.rejected_counts)`` (``reference=False``);
  ``orpo_loss(..., nll_logps=p.nll_logps, nll_counts=p.nll_counts)`` (``reference=False,
  nll=True``).

  Args:
    model: has ``hidden_states`` and ``head`` (a ``jlora.models.Decoder``).
    params: the LoRA tree.
    batch: ``input_ids``, ``attention_mask``, ``completion_mask``, ``(2B, T)``.
    reference: also compute the reference's log-probs (adapters off, no gradient); DPO and
      KTO need them, SimPO and ORPO do not.
    nll: also sum the chosen rows over every real token (ORPO's NLL reads the prompt too).
    chunk_size: positions per block of logits.
    temperature: the logits are divided by it.
    lora_rng: LoRA dropout key for the policy pass.

  Returns:
    A ``PreferenceLogps``.

  Raises:
    ValueError: missing keys, mismatched shapes or an odd number of rows.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from jlora.models import Decoder, ModelConfig
    >>> from jlora.objectives import dpo_loss, preference_logps
    >>> model = Decoder(ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
    ...   "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}))
    >>> lp = jlora.init(jax.random.key(0), model.init(jax.random.key(1)),
    ...                 jlora.LoraConfig(rank=2, targets=model.targets("all-linear")), layout=model.layout)
    >>> batch = {"input_ids": jnp.array([[1, 2, 3, 4], [1, 2, 5, 0]]),
    ...          "attention_mask": jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]]),
    ...          "completion_mask": jnp.array([[0, 0, 1, 1], [0, 0, 1, 0]])}
    >>> p = jax.jit(preference_logps, static_argnums=0)(model, lp, batch)
    >>> p.chosen_counts.tolist(), p.rejected_counts.tolist()
    ([2], [1])
    >>> loss, metrics = dpo_loss(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected)
    >>> round(float(loss), 4), float(metrics["rewards/chosen"])  # B = 0: every reward is 0
    (0.6931, 0.0)
  """
  fn = "preference_logps"
  _check_batch(fn, batch, ("input_ids", "attention_mask", "completion_mask"))
  ids, attn, comp = (jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "completion_mask"))
  rows = ids.shape[0]
  if rows % 2:
    raise ValueError(f"{fn}: the batch must stack B chosen rows and then B rejected rows, got {rows} rows.")
  b = rows // 2
  comp = comp.astype(bool) & attn.astype(bool)
  scored = comp
  if nll:  # the chosen rows: every real token; the rejected rows: their completion
    scored = jnp.concatenate([attn[:b].astype(bool), comp[b:]])
  opts = dict(attention_mask=attn, chunk_size=chunk_size, temperature=temperature)
  tok = model_token_logprobs(model, params, ids, scored, lora_rng=lora_rng, **opts)
  pos = next_token_labels(ids, comp) >= 0  # the completion positions
  sums = jnp.sum(jnp.where(pos, tok, 0.0), axis=1)
  counts = jnp.sum(pos, axis=1, dtype=jnp.int32)
  out = dict(chosen=sums[:b], rejected=sums[b:], chosen_counts=counts[:b], rejected_counts=counts[b:])
  if nll:
    out["nll_logps"] = jnp.sum(tok[:b], axis=1)
    out["nll_counts"] = jnp.sum(next_token_labels(ids[:b], attn[:b]) >= 0, axis=1, dtype=jnp.int32)
  if reference:
    ref = jnp.sum(model_token_logprobs(model, params, ids, comp, reference=True, **opts), axis=1)
    out["ref_chosen"], out["ref_rejected"] = ref[:b], ref[b:]
  return PreferenceLogps(**out)


class KTOLogps(NamedTuple):
  """Per-completion log-probs of a KTO batch (``kto_logps``); a pytree."""

  policy: jax.Array  # (N,) summed completion log-probs (policy, differentiated)
  ref: jax.Array  # (N,) the reference's (adapters off, no gradient)
  policy_kl: jax.Array  # (N,) the mismatched pairs' under the policy (no gradient, as in TRL)
  ref_kl: jax.Array  # (N,) the mismatched pairs' under the reference


def kto_logps(model: Any, params: Params, batch: Batch, *, chunk_size: int = 1024, temperature: float = 1.0,
              lora_rng: jax.Array | None = None) -> KTOLogps:
  """The four log-prob sums KTO needs: policy and reference, on the batch and on its KL pairs.

  ``batch`` holds TRL's ``DataCollatorForUnpairedPreference`` arrays: ``input_ids``,
  ``attention_mask``, ``completion_mask`` and their ``KL_`` counterparts (prompt ``x_i`` with
  completion ``y_{i−1}``, see ``kl_completions``). Four passes: the policy on the batch (the
  only one differentiated), the policy on the KL pairs (adapters on, no gradient) and the
  reference on both.

  Args:
    model: has ``hidden_states`` and ``head`` (a ``jlora.models.Decoder``).
    params: the LoRA tree.
    batch: the six arrays, each ``(N, T)`` (the ``KL_`` ones may have another length).
    chunk_size: positions per block of logits.
    temperature: the logits are divided by it.
    lora_rng: LoRA dropout key for the differentiated policy pass.

  Returns:
    A ``KTOLogps``; pass it with ``batch["label"]`` to ``kto_loss``.

  Raises:
    ValueError: missing keys or mismatched shapes.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from jlora.models import Decoder, ModelConfig
    >>> from jlora.objectives import kto_logps
    >>> model = Decoder(ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
    ...   "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}))
    >>> lp = jlora.init(jax.random.key(0), model.init(jax.random.key(1)),
    ...                 jlora.LoraConfig(rank=2, targets=model.targets("all-linear")), layout=model.layout)
    >>> rows = {"input_ids": jnp.array([[1, 2, 3], [1, 4, 5]]), "attention_mask": jnp.ones((2, 3), int),
    ...         "completion_mask": jnp.array([[0, 1, 1], [0, 1, 1]])}
    >>> batch = {**rows, **{"KL_" + k: v[::-1] for k, v in rows.items()}}
    >>> jax.jit(kto_logps, static_argnums=0)(model, lp, batch).policy.shape
    (2,)
  """
  fn = "kto_logps"
  _check_batch(fn, batch, ("input_ids", "attention_mask", "completion_mask"))
  _check_batch(fn, batch, ("KL_input_ids", "KL_attention_mask", "KL_completion_mask"))
  if jnp.shape(batch["input_ids"])[0] != jnp.shape(batch["KL_input_ids"])[0]:
    raise ValueError(f"{fn}: one KL sequence per example is needed, got {jnp.shape(batch['input_ids'])[0]} rows and "
                     f"{jnp.shape(batch['KL_input_ids'])[0]} KL rows.")
  opts = dict(chunk_size=chunk_size, temperature=temperature)

  def sums(prefix: str, p: Params, **kw) -> jax.Array:
    ids, attn, comp = (jnp.asarray(batch[prefix + k]) for k in ("input_ids", "attention_mask", "completion_mask"))
    comp = comp.astype(bool) & attn.astype(bool)
    return jnp.sum(model_token_logprobs(model, p, ids, comp, attention_mask=attn, **opts, **kw), axis=1)

  return KTOLogps(policy=sums("", params, lora_rng=lora_rng), ref=sums("", params, reference=True),
                  policy_kl=sums("KL_", jax.lax.stop_gradient(params)), ref_kl=sums("KL_", params, reference=True))
