"""End to end against TRL 1.16 on PyTorch: the same tiny Llama, the same adapter, the same batches.

jlora's adapter (random non-zero A and B) is exported with ``jlora.peft.save`` and loaded as
TRL's ``PeftModel``; both sides see the same token ids and masks (built once, no tokenizer).
For every loss type the loss, TRL's logged metrics and every LoRA gradient agree at float32
tolerance (PEFT's ``lora_A.weight`` ``(r, in)`` is jlora's ``a[layer]`` transposed, ``lora_B.weight``
``(out, r)`` its ``b[layer]`` transposed).

The reference is the model with the adapter disabled on both sides. TRL 1.16, given a
``PeftModel`` and no ``ref_model``, would add a frozen copy of the loaded adapter named
``"ref"`` (post_training.md §2.6) and use it as the reference; the test deletes that copy so
that TRL's ``use_adapter(model, None)`` disables the adapter, which is TRL's reference for a
fresh adapter and jlora's (``jlora.unload``) for any adapter.

jlora runs each model pass once (``jax.vjp`` of the jitted log-prob function) and applies each
loss's gradient with respect to the log-probs through that VJP: the chain rule, with one
compilation of the model per batch instead of one per loss type.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import objectives as ob
from objective_data import VOCAB, pad_rows, preference_batch, preference_records

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4  # of the largest gradient entry of each factor; float32 both sides, summation orders differ
CHUNK = 4  # positions per block of logits: several chunks per batch


def _peft_model(tiny):
  base = transformers.AutoModelForCausalLM.from_pretrained(tiny.directory)
  return peft.PeftModel.from_pretrained(base, tiny.peft_dir, is_trainable=True)


def _args(cls, tmp_path, **kw):
  return cls(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
             **kw)


def _tokenizer():
  import os

  import jlora as _j

  return transformers.AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(_j.__file__), "assets", "tiny-base"))


def _drop_ref_adapter(pm):
  if "ref" in pm.peft_config:
    pm.delete_adapter("ref")
  assert list(pm.peft_config) == ["default"]


def _grad_errors(tiny, pm, grads) -> tuple[float, float]:
  """Largest |jlora − PEFT| of a LoRA gradient: absolute, and relative to that factor's largest entry."""
  named = dict(pm.named_parameters())
  worst_abs = worst_rel = 0.0
  ws = jlora._checkpoint.adapter_weights(grads)
  assert len(ws) == 7
  for path, w in ws.items():
    for layer in range(w.a.shape[0]):
      module = tiny.model.module_map.to_module(path, (layer,))
      for factor, ours in (("lora_A", w.a[layer]), ("lora_B", w.b[layer])):
        theirs = named[f"base_model.model.{module}.{factor}.default.weight"].grad.numpy()
        diff = float(np.abs(np.asarray(ours).T - theirs).max())
        assert np.abs(theirs).max() > 0
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / float(np.abs(theirs).max()))
  return worst_abs, worst_rel


def _torch_backward(pm, loss_fn):
  pm.zero_grad(set_to_none=True)
  loss = loss_fn()
  loss.backward()
  return loss.detach().item()


def _check(name, tiny, pm, their_loss, their_metrics, our_loss, our_metrics, grads):
  err_abs, err = _grad_errors(tiny, pm, grads)
  loss_abs = abs(float(our_loss) - their_loss)
  loss_err = loss_abs / max(abs(their_loss), 1e-30)
  metric_abs = max([abs(float(our_metrics[k]) - float(v)) for k, v in their_metrics.items() if k in our_metrics])
  print(f"\nTRL parity {name}: loss {their_loss:.6g} (diff {loss_abs:.1e}, rel {loss_err:.1e}); LoRA grads max "
        f"diff {err_abs:.1e} (rel to the factor's largest {err:.1e}); metrics max diff {metric_abs:.1e}")
  assert loss_err < LOSS_RTOL, (our_loss, their_loss)
  assert err < GRAD_RTOL
  for k, v in their_metrics.items():
    if k in our_metrics:
      np.testing.assert_allclose(float(our_metrics[k]), float(v), rtol=1e-5, atol=1e-6, err_msg=k)
  return err


@dataclasses.dataclass
class Paired:
  batch: dict  # TRL DPO collator arrays, numpy
  logps: ob.PreferenceLogps  # policy and reference, at the adapter
  vjp: object  # cotangent of ``logps`` -> LoRA gradients (adapters tree)


@pytest.fixture(scope="module")
def paired(tiny):
  records = preference_records(seed=0, pairs=3)
  batch = preference_batch(records)
  adapters, frozen = jlora.split(tiny.lora)
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  fn = jax.jit(lambda a: ob.preference_logps(tiny.model, jlora.combine(a, frozen), jb, nll=True, chunk_size=CHUNK))
  logps, vjp = jax.vjp(fn, adapters)
  return Paired(batch, logps, lambda ct: vjp(ct)[0])


def _loss_and_grads(paired, loss_fn):
  (loss, metrics), ct = jax.value_and_grad(loss_fn, has_aux=True, allow_int=True)(paired.logps)
  return loss, metrics, paired.vjp(ct)


@pytest.mark.parametrize("loss_type,beta,eps", [("sigmoid", 0.1, 0.0), ("ipo", 0.1, 0.0), ("hinge", 0.5, 0.0),
                                                ("robust", 0.1, 0.2)])
def test_dpo(tiny, paired, tmp_path, loss_type, beta, eps):
  pm = _peft_model(tiny)
  ds = datasets.Dataset.from_dict({"prompt": ["a b", "c"], "chosen": [" d", " e"], "rejected": [" f", " g"]})
  trainer = trl.DPOTrainer(model=pm, args=_args(trl.DPOConfig, tmp_path, beta=beta, loss_type=[loss_type],
                                                label_smoothing=eps), train_dataset=ds, processing_class=_tokenizer())
  _drop_ref_adapter(pm)
  inputs = {k: torch.as_tensor(v) for k, v in paired.batch.items()}
  their = _torch_backward(pm, lambda: trainer.compute_loss(pm, inputs))
  mode = "train" if pm.training else "eval"
  their_metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}

  def loss_fn(p):
    return ob.dpo_loss(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, beta=beta, loss_type=loss_type,
                       label_smoothing=eps, chosen_counts=p.chosen_counts, rejected_counts=p.rejected_counts)

  loss, metrics, grads = _loss_and_grads(paired, loss_fn)
  assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
          "logps/rejected"} <= set(their_metrics) & set(metrics)
  _check(f"DPO {loss_type}", tiny, pm, their, their_metrics, loss, metrics, grads)


def _cpo_batch(batch):
  """CPO/ORPO's concatenated layout: ``chosen_*``/``rejected_*`` with -100 labels outside the completion."""
  ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
  b = ids.shape[0] // 2
  labels = np.where(comp == 1, ids, -100)
  out = {}
  for side, rows in (("chosen", slice(0, b)), ("rejected", slice(b, None))):
    out[f"{side}_input_ids"] = torch.as_tensor(ids[rows])
    out[f"{side}_attention_mask"] = torch.as_tensor(attn[rows])
    out[f"{side}_labels"] = torch.as_tensor(labels[rows])
  return out


def _cpo_dataset():
  return datasets.Dataset.from_dict({"prompt": ["a b", "c"], "chosen": [" d", " e"], "rejected": [" f", " g"]})


@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_simpo(tiny, paired, tmp_path, cpo_alpha):
  from trl.experimental.cpo import CPOConfig, CPOTrainer

  beta, gamma = 2.0, 0.5
  pm = _peft_model(tiny)
  trainer = CPOTrainer(model=pm, args=_args(CPOConfig, tmp_path, loss_type="simpo", beta=beta, simpo_gamma=gamma,
                                            cpo_alpha=cpo_alpha, max_length=64),
                       train_dataset=_cpo_dataset(), processing_class=_tokenizer())
  inputs = _cpo_batch(paired.batch)
  box = {}

  def run():
    box["loss"], box["metrics"] = trainer.get_batch_loss_metrics(pm, inputs)
    return box["loss"]

  their = _torch_backward(pm, run)

  def loss_fn(p):
    return ob.simpo_loss(p.chosen, p.rejected, p.chosen_counts, p.rejected_counts, beta=beta, gamma=gamma,
                         cpo_alpha=cpo_alpha)

  loss, metrics, grads = _loss_and_grads(paired, loss_fn)
  _check(f"SimPO (CPO loss_type='simpo', cpo_alpha={cpo_alpha})", tiny, pm, their, box["metrics"], loss, metrics,
         grads)


def test_orpo(tiny, paired, tmp_path):
  from trl.experimental.orpo import ORPOConfig, ORPOTrainer

  beta = 0.1
  pm = _peft_model(tiny)
  trainer = ORPOTrainer(model=pm, args=_args(ORPOConfig, tmp_path, beta=beta, max_length=64),
                        train_dataset=_cpo_dataset(), processing_class=_tokenizer())
  inputs = _cpo_batch(paired.batch)
  box = {}

  def run():
    box["loss"], box["metrics"] = trainer.get_batch_loss_metrics(pm, inputs)
    return box["loss"]

  their = _torch_backward(pm, run)

  def loss_fn(p):
    return ob.orpo_loss(p.chosen, p.rejected, p.chosen_counts, p.rejected_counts, nll_logps=p.nll_logps,
                        nll_counts=p.nll_counts, beta=beta)

  loss, metrics, grads = _loss_and_grads(paired, loss_fn)
  assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= set(box["metrics"]) & set(metrics)
  _check("ORPO", tiny, pm, their, box["metrics"], loss, metrics, grads)


def _kto_batch(seed: int = 1, n: int = 4):
  """TRL's ``DataCollatorForUnpairedPreference`` arrays, KL completions rotated within the batch."""
  rng = np.random.default_rng(seed)
  prompts = [[1] + rng.integers(3, VOCAB, rng.integers(2, 6)).tolist() for _ in range(n)]
  completions = [rng.integers(3, VOCAB, rng.integers(2, 7)).tolist() + [2] for _ in range(n)]
  out = {}
  for prefix, comps in (("", completions), ("KL_", ob.kl_completions(completions, batch_size=n))):
    out[prefix + "input_ids"] = pad_rows([p + c for p, c in zip(prompts, comps)])
    out[prefix + "attention_mask"] = pad_rows([[1] * (len(p) + len(c)) for p, c in zip(prompts, comps)], 0)
    out[prefix + "completion_mask"] = pad_rows([[0] * len(p) + [1] * len(c) for p, c in zip(prompts, comps)], 0)
  out["label"] = np.array([True, False, True, False])
  return out


def test_kto(tiny, tmp_path):
  beta, w_d, w_u = 0.1, 1.0, 1.3
  batch = _kto_batch()
  pm = _peft_model(tiny)
  ds = datasets.Dataset.from_dict({"prompt": ["a", "b"], "completion": [" c", " d"], "label": [True, False]})
  trainer = trl.KTOTrainer(model=pm, args=_args(trl.KTOConfig, tmp_path, beta=beta, desirable_weight=w_d,
                                                undesirable_weight=w_u, per_device_train_batch_size=2),
                           train_dataset=ds, processing_class=_tokenizer())
  _drop_ref_adapter(pm)
  inputs = {k: torch.as_tensor(v) for k, v in batch.items()}
  their = _torch_backward(pm, lambda: trainer.compute_loss(pm, inputs))
  mode = "train" if pm.training else "eval"
  their_metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}

  adapters, frozen = jlora.split(tiny.lora)
  jb = {k: jnp.asarray(v) for k, v in batch.items() if k != "label"}
  logps, vjp = jax.vjp(jax.jit(lambda a: ob.kto_logps(tiny.model, jlora.combine(a, frozen), jb, chunk_size=CHUNK)),
                       adapters)

  def loss_fn(k):
    return ob.kto_loss(k.policy, k.ref, k.policy_kl, k.ref_kl, batch["label"], beta=beta, desirable_weight=w_d,
                       undesirable_weight=w_u)

  (loss, metrics), ct = jax.value_and_grad(loss_fn, has_aux=True, allow_int=True)(logps)
  assert float(metrics["kl"]) > 0  # the KL estimate is active (not clamped to 0)
  assert {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"} \
      <= set(their_metrics) & set(metrics)
  _check("KTO", tiny, pm, their, their_metrics, loss, metrics, vjp(ct)[0])
