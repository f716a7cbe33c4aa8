"""Post-training objectives as pure JAX functions, and log-probabilities without ``(B, T, V)`` logits.

Two layers, usable from any training loop:

* **Log-probabilities.** ``token_logprobs(hidden, head, labels)`` applies the output head in
  chunks of supervised positions under a custom VJP (no logits kept, none recomputed);
  ``model_token_logprobs``, ``preference_logps`` and ``kto_logps`` run a wrapped
  ``jlora.models.Decoder`` for the policy (adapters on) and the reference (adapters off,
  ``jlora.unload`` under ``stop_gradient``: the same base arrays).
* **Losses** of per-sequence log-probs, with TRL 1.16's formulas, defaults and metric names:
  ``dpo_loss`` (``sigmoid``, ``ipo``, ``hinge``, ``robust``), ``simpo_loss``, ``orpo_loss``,
  ``kto_loss``. Each returns ``(loss, metrics)``.
* **Reinforcement learning** (GRPO and its variants): ``rollout`` samples ``G`` completions of
  each prompt from the unmerged adapters with the jitted KV-cache generator;
  ``grpo_advantages`` and ``grpo_loss`` / ``grpo_loss_terms`` (``grpo``, ``bnpo``, ``dr_grpo``,
  ``dapo``; GSPO's sequence-level ratio; the k3 KL to the base) are TRL 1.16's.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jlora import objectives
  >>> ids, mask = jnp.array([[1, 2, 3, 4]]), jnp.array([[0, 1, 1, 1]])
  >>> head = objectives.Head(jax.random.normal(jax.random.key(0), (8, 16)))  # Decoder.head(params)
  >>> def sft(hidden):  # mean NLL of the completion, logits in chunks of 2 positions
  ...   labels = objectives.next_token_labels(ids, mask)
  ...   tok = objectives.token_logprobs(hidden, head, labels, chunk_size=2)
  ...   return -objectives.mean_logps(tok, labels >= 0).mean()
  >>> jax.jit(jax.grad(sft))(jnp.ones((1, 4, 8))).shape  # Decoder.hidden_states(params, ids)
  (1, 4, 8)
"""

from jlora.models.decoder import Head
from jlora.objectives._batch import KTOLogps
from jlora.objectives._batch import PreferenceLogps
from jlora.objectives._batch import kto_logps
from jlora.objectives._batch import model_token_logprobs
from jlora.objectives._batch import preference_logps
from jlora.objectives._dpo import DPO_LOSS_TYPES
from jlora.objectives._dpo import dpo_loss
from jlora.objectives._grpo import GRPO_LOSS_TYPES
from jlora.objectives._grpo import IMPORTANCE_SAMPLING_LEVELS
from jlora.objectives._grpo import SCALE_REWARDS
from jlora.objectives._grpo import grpo_advantages
from jlora.objectives._grpo import grpo_loss
from jlora.objectives._grpo import grpo_loss_terms
from jlora.objectives._grpo import grpo_reward_metrics
from jlora.objectives._kto import kl_completions
from jlora.objectives._kto import kto_loss
from jlora.objectives._logprobs import mean_logps
from jlora.objectives._logprobs import next_token_labels
from jlora.objectives._logprobs import sequence_logps
from jlora.objectives._logprobs import token_logprobs
from jlora.objectives._logprobs import token_logprobs_full
from jlora.objectives._reference_free import orpo_loss
from jlora.objectives._reference_free import simpo_loss
from jlora.objectives._rollout import Rollout
from jlora.objectives._rollout import pad_prompts
from jlora.objectives._rollout import rollout

__all__ = [
    "DPO_LOSS_TYPES",
    "GRPO_LOSS_TYPES",
    "Head",
    "IMPORTANCE_SAMPLING_LEVELS",
    "KTOLogps",
    "PreferenceLogps",
    "Rollout",
    "SCALE_REWARDS",
    "dpo_loss",
    "grpo_advantages",
    "grpo_loss",
    "grpo_loss_terms",
    "grpo_reward_metrics",
    "kl_completions",
    "kto_logps",
    "kto_loss",
    "mean_logps",
    "model_token_logprobs",
    "next_token_labels",
    "orpo_loss",
    "pad_prompts",
    "preference_logps",
    "rollout",
    "sequence_logps",
    "simpo_loss",
    "token_logprobs",
    "token_logprobs_full",
]
