"""Each loss against TRL 1.16's own loss code on random log-probs (PyTorch float64), values, metrics and gradients.

TRL's losses live inside its trainers' methods. They run here unbound on a stand-in trainer
(``object.__new__``, only the attributes the method reads) and a stand-in model that
returns the given per-token log-probs (as TRL's fused LM head would, zero outside the
completion), so the code under test is TRL's, line for line: ``DPOTrainer._compute_loss``,
``CPOTrainer.get_batch_loss_metrics`` (+ ``cpo_loss``), ``ORPOTrainer.get_batch_loss_metrics``
(+ ``odds_ratio_loss``) and ``KTOTrainer._compute_loss``.
"""

from __future__ import annotations

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import objectives as ob

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from trl import DPOTrainer, KTOTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

RTOL = 2e-6  # jlora in float32 against TRL in float64


def _accelerator():
  return types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
                               unwrap_model=lambda m: m)


def _stub(cls, **attrs):
  """A trainer of class ``cls`` without ``__init__``: only what its loss method reads."""
  t = object.__new__(cls)
  t.__dict__.update(accelerator=_accelerator(), _metrics={"train": collections.defaultdict(list),
                                                          "eval": collections.defaultdict(list)},
                    _total_train_tokens=0, _tp_size=1, aux_loss_enabled=False, **attrs)
  return t


class _FusedModel:
  """Stands in for a model with TRL's fused LM head: ``log_probs`` looked up by the ``input_ids`` tensor."""

  training = True
  is_gradient_checkpointing = False

  def __init__(self, table):
    self.table = table  # id(input_ids tensor) -> (rows, T - 1) per-token log-probs

  def __call__(self, input_ids, labels=None, fused_lm_head=False, **kwargs):
    lp = self.table[id(input_ids)]
    zeros = torch.zeros_like(lp)
    return types.SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _random_tokens(rng, rows: int, width: int):
  """Per-token log-probs (float64, requiring grad) and a completion mask with 1-5 tokens per row."""
  comp = np.zeros((rows, width), np.int64)
  for i in range(rows):
    n = rng.integers(1, 6)
    start = rng.integers(1, width - n + 1)
    comp[i, start:start + n] = 1
  tok = -rng.exponential(2.0, (rows, width - 1)) * comp[:, 1:]
  return torch.tensor(tok, dtype=torch.float64, requires_grad=True), comp


def _grad_of_sums(tok_grad: torch.Tensor, comp: np.ndarray) -> np.ndarray:
  """d loss / d (a row's summed log-prob): the gradient at any of its completion positions."""
  g = tok_grad.numpy()
  first = np.argmax(comp[:, 1:], axis=1)
  return g[np.arange(len(g)), first]


def _close(got, want, rtol=RTOL):
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=rtol,
                             atol=rtol * max(1.0, float(np.abs(want).max())))


def _check_metrics(ours: dict, theirs: dict, names):
  assert set(names) <= set(ours), sorted(ours)
  for k in names:
    _close(ours[k], theirs[k])


PAIRED = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
          "logps/rejected")


@pytest.mark.parametrize("loss_type,beta,eps", [("sigmoid", 0.1, 0.0), ("ipo", 0.1, 0.0), ("hinge", 0.5, 0.0),
                                                ("robust", 0.1, 0.2), ("robust", 0.3, 0.0)])
def test_dpo_matches_trl(loss_type, beta, eps):
  rng = np.random.default_rng(0)
  b, width = 6, 12
  tok, comp = _random_tokens(rng, 2 * b, width)
  ref = torch.tensor(-rng.exponential(6.0, 2 * b), dtype=torch.float64)
  inputs = {"input_ids": torch.zeros((2 * b, width), dtype=torch.int64), "attention_mask": torch.ones((2 * b, width)),
            "completion_mask": torch.as_tensor(comp), "ref_chosen_logps": ref[:b], "ref_rejected_logps": ref[b:]}
  model = _FusedModel({id(inputs["input_ids"]): tok})
  trainer = _stub(DPOTrainer, model=model, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                  loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=eps, use_weighting=False)
  want = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
  want.backward()

  sums = tok.detach().numpy().sum(1)
  counts = comp.sum(1)  # TRL's IPO normaliser: the unshifted completion mask

  def loss(s):
    return ob.dpo_loss(s[:b], s[b:], ref[:b].numpy(), ref[b:].numpy(), beta=beta, loss_type=loss_type,
                       label_smoothing=eps, chosen_counts=counts[:b], rejected_counts=counts[b:])

  (got, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(sums, jnp.float32))
  _close(got, want.item())
  _close(grad, _grad_of_sums(tok.grad, comp))
  _check_metrics(metrics, {k: v[-1] for k, v in trainer._metrics["train"].items()}, PAIRED)


def _pair_sums(rng, b):
  sums = torch.tensor(-rng.exponential(8.0, 2 * b), dtype=torch.float64, requires_grad=True)
  counts = rng.integers(1, 9, 2 * b)
  return sums, counts


@pytest.mark.parametrize("cpo_alpha,eps", [(0.0, 0.0), (1.0, 0.0), (0.5, 0.1)])
def test_simpo_matches_trl_cpo(cpo_alpha, eps):
  rng = np.random.default_rng(1)
  b, beta, gamma = 5, 2.5, 1.375
  sums, counts = _pair_sums(rng, b)
  c = torch.as_tensor(counts, dtype=torch.float64)
  means = sums / c  # TRL's get_batch_logps(average_log_prob=True) for "simpo"
  nll = -sums[:b].sum() / c[:b].sum()  # CrossEntropyLoss over the chosen completions' tokens
  trainer = _stub(CPOTrainer, alpha=0.0, beta=beta, simpo_gamma=gamma, loss_type="simpo", label_smoothing=eps,
                  cpo_alpha=cpo_alpha)
  trainer.concatenated_forward = lambda model, batch: (means[:b], means[b:], torch.zeros(1), torch.zeros(1),
                                                       nll if cpo_alpha else torch.tensor(0.0))
  want, theirs = CPOTrainer.get_batch_loss_metrics(trainer, None, {})
  want.backward()

  def loss(s):
    return ob.simpo_loss(s[:b], s[b:], counts[:b], counts[b:], beta=beta, gamma=gamma, label_smoothing=eps,
                         cpo_alpha=cpo_alpha)

  (got, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(sums.detach().numpy(), jnp.float32))
  _close(got, want.item())
  _close(grad, sums.grad.numpy())
  _check_metrics(metrics, theirs, (*PAIRED, "nll_loss"))


def test_orpo_matches_trl():
  rng = np.random.default_rng(2)
  b, beta = 5, 0.1
  sums, counts = _pair_sums(rng, b)
  nll_sums = torch.tensor(-rng.exponential(30.0, b), dtype=torch.float64, requires_grad=True)
  nll_counts = counts[:b] + rng.integers(1, 9, b)
  c = torch.as_tensor(counts, dtype=torch.float64)
  means = sums / c
  nll = -nll_sums.sum() / float(nll_counts.sum())
  trainer = _stub(ORPOTrainer, beta=beta)
  trainer.concatenated_forward = lambda model, batch: (means[:b], means[b:], torch.zeros(1), torch.zeros(1), nll)
  want, theirs = ORPOTrainer.get_batch_loss_metrics(trainer, None, {})
  want.backward()

  def loss(s, n):
    return ob.orpo_loss(s[:b], s[b:], counts[:b], counts[b:], nll_logps=n, nll_counts=nll_counts, beta=beta)

  (got, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      jnp.asarray(sums.detach().numpy(), jnp.float32), jnp.asarray(nll_sums.detach().numpy(), jnp.float32))
  _close(got, want.item())
  _close(grads[0], sums.grad.numpy())
  _close(grads[1], nll_sums.grad.numpy())
  _check_metrics(metrics, theirs, (*PAIRED, "nll_loss", "log_odds_ratio", "log_odds_chosen"))


@pytest.mark.parametrize("labels,weights", [([1, 0, 1, 1, 0, 0, 1], (1.0, 1.0)), ([1, 0, 0, 0, 1, 0, 0], (1.3, 0.7)),
                                            ([1, 1, 1, 1, 1, 1, 1], (1.0, 1.0))])
def test_kto_matches_trl(labels, weights):
  rng = np.random.default_rng(3)
  n, width, beta = len(labels), 10, 0.2
  tok, comp = _random_tokens(rng, n, width)
  kl_tok = torch.tensor(-rng.exponential(2.0, (n, width - 1)) * comp[:, 1:], dtype=torch.float64)
  ref = torch.tensor(-rng.exponential(6.0, n), dtype=torch.float64)
  ref_kl = torch.tensor(-rng.exponential(6.0, n), dtype=torch.float64)
  ref_kl[0] -= 30.0  # a positive KL estimate (z0 > 0)
  inputs = {"input_ids": torch.zeros((n, width), dtype=torch.int64), "attention_mask": torch.ones((n, width)),
            "completion_mask": torch.as_tensor(comp), "KL_input_ids": torch.zeros((n, width), dtype=torch.int64),
            "KL_attention_mask": torch.ones((n, width)), "KL_completion_mask": torch.as_tensor(comp),
            "label": torch.tensor(labels, dtype=torch.bool), "ref_logps": ref, "ref_KL_logps": ref_kl}
  model = _FusedModel({id(inputs["input_ids"]): tok, id(inputs["KL_input_ids"]): kl_tok})
  trainer = _stub(KTOTrainer, model=model, calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=beta,
                  desirable_weight=weights[0], undesirable_weight=weights[1])
  trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)
  want = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
  want.backward()

  def loss(s):
    return ob.kto_loss(s, ref.numpy(), kl_tok.numpy().sum(1), ref_kl.numpy(), np.array(labels, bool), beta=beta,
                       desirable_weight=weights[0], undesirable_weight=weights[1])

  (got, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(tok.detach().numpy().sum(1), jnp.float32))
  _close(got, want.item())
  _close(grad, _grad_of_sums(tok.grad, comp))
  theirs = {k: v[-1] for k, v in trainer._metrics["train"].items()}
  assert float(theirs["kl"]) > 0
  logged = [k for k in ("kl", "rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected",
                        "rewards/margins") if k in theirs]
  _check_metrics(metrics, theirs, logged)
  for k in set(metrics) - set(logged):  # what TRL does not log (a label absent from the batch) is NaN
    assert np.isnan(float(metrics[k])), k


def test_kl_completions_rotate_like_trl():
  completions = [[i] for i in range(7)]
  # TRL's add_kl_completion_ids, applied by datasets.map(batched=True, batch_size=3)
  want = []
  for s in range(0, 7, 3):
    block = completions[s:s + 3]
    want.extend([block[-1]] + block[:-1])
  assert ob.kl_completions(completions, batch_size=3) == want
  with pytest.raises(ValueError, match="batch_size must be an int >= 2"):
    ob.kl_completions(completions, batch_size=1)


def test_bad_options_are_refused():
  x = jnp.zeros(3)
  with pytest.raises(ValueError, match="unknown loss_type 'nca_pair'"):
    ob.dpo_loss(x, x, x, x, loss_type="nca_pair")
  with pytest.raises(ValueError, match="beta must be a positive number"):
    ob.dpo_loss(x, x, x, x, beta=0.0)
  with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\) for loss_type='robust'"):
    ob.dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
  with pytest.raises(ValueError, match="label_smoothing=0.1 has no effect with loss_type='sigmoid'"):
    ob.dpo_loss(x, x, x, x, label_smoothing=0.1)
  with pytest.raises(ValueError, match="loss_type='ipo' normalises by completion length"):
    ob.dpo_loss(x, x, x, x, loss_type="ipo")
  with pytest.raises(ValueError, match=r"policy_chosen \(3,\), policy_rejected \(2,\)"):
    ob.dpo_loss(x, x[:2], x, x)
  with pytest.raises(ValueError, match="gamma must be a number >= 0"):
    ob.simpo_loss(x, x, x, x, gamma=-1.0)
  with pytest.raises(ValueError, match="cpo_alpha must be a number >= 0"):
    ob.simpo_loss(x, x, x, x, cpo_alpha=-0.5)
  with pytest.raises(ValueError, match=r"simpo_loss: label_smoothing must be in \[0, 0.5\)"):
    ob.simpo_loss(x, x, x, x, label_smoothing=0.7)
  with pytest.raises(ValueError, match="orpo_loss: beta must be a positive number"):
    ob.orpo_loss(x, x, x, x, nll_logps=x, nll_counts=x, beta=-1)
  with pytest.raises(ValueError, match="kto_loss: beta must be a positive number"):
    ob.kto_loss(x, x, x, x, x, beta=0)
  with pytest.raises(ValueError, match="undesirable_weight must be a number >= 0"):
    ob.kto_loss(x, x, x, x, x, undesirable_weight=-1.0)
