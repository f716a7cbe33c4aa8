"""GRPO against TRL 1.16's GRPOTrainer on PyTorch: the same tiny Llama, adapter, prompts, completions and rewards.

jlora's adapter (random non-zero A and B) is exported with ``jlora.peft.save`` and loaded as a
``PeftModel``. TRL's generation is replaced by the fixed completions (``_generate`` returns
them), so that ``_generate_and_score_completions`` computes, from the same token ids, what TRL
computes at rollout time: the rewards of two reward functions (weights 1 and 0.5), the
advantages, the old policy's log-probs (``num_iterations > 1``) and the reference's (``beta >
0``, the adapter disabled: the frozen "ref" copy TRL makes of a loaded adapter is deleted, as in
the DPO parity test). ``_compute_loss`` then gives the loss and the LoRA gradients.

For ``num_iterations = 2`` the rollout is scored by one adapter (A0) and the loss taken with
another (A1, as after an optimizer step), on both sides: the ratios are far from 1 and the
clipping is active (checked).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randomize

import jlora
import jlora.peft
from jlora import objectives as ob
from objective_data import VOCAB, pad_rows

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

G = 4  # completions per prompt
C = 8  # max_completion_length
TEMPERATURE = 0.7
CHUNK = 8
LOSS_RTOL = 2e-5
LOGP_RTOL = 1e-5  # of the largest |log-prob| (random O(1) weights: log-probs of tens)
GRAD_RTOL = 1e-4  # of the largest gradient entry of each factor
# Two prompts, four completions each (some end with EOS = 2, some are cut at C tokens), two reward functions.
REWARDS_A = [1.0, 0.0, 1.0, 0.5, 0.0, 0.0, 1.0, 0.25]
REWARDS_B = [0.0, 2.0, 1.0, 0.0, 3.0, 1.0, 0.0, 0.0]
WEIGHTS = [1.0, 0.5]


def reward_a(prompts, completions, a, **kwargs):
  return list(a)


def reward_b(prompts, completions, b, **kwargs):
  return list(b)


def _records():
  rng = np.random.default_rng(3)
  prompts = [[1] + rng.integers(3, VOCAB, n).tolist() for n in (3, 6)]
  completions = []
  for i in range(2 * G):
    n = int(rng.integers(1, C))
    row = rng.integers(3, VOCAB, n).tolist()
    completions.append(row + [2] if i % 3 else rng.integers(3, VOCAB, C).tolist())  # every third: cut at C
  return prompts, completions


@dataclasses.dataclass
class Side:
  ids: np.ndarray  # (N, P + C) left-padded prompts, right-padded completions
  attn: np.ndarray
  comp: np.ndarray  # completion tokens
  pos: np.ndarray  # positions that score them


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
  prompts, completions = _records()
  p = max(len(x) for x in prompts)
  rows = [prompts[i // G] for i in range(2 * G)]
  ids = np.zeros((2 * G, p + C), np.int32)
  attn = np.zeros_like(ids)
  comp = np.zeros_like(ids)
  for i, (pr, co) in enumerate(zip(rows, completions)):
    ids[i, p - len(pr):p] = pr
    ids[i, p:p + len(co)] = co
    attn[i, p - len(pr):p + len(co)] = 1
    comp[i, p:p + len(co)] = 1
  pos = np.asarray(ob.next_token_labels(jnp.asarray(ids), jnp.asarray(comp)) >= 0)
  side = Side(ids, attn, comp, pos)
  a1 = randomize(tiny.lora, jax.random.key(7, impl="rbg"), scale=0.3)  # the adapter "after an update"
  a1_dir = jlora.peft.save(str(tmp_path_factory.mktemp("peft_a1")), a1, module_map=tiny.model.module_map,
                           base_model_name_or_path=tiny.directory)
  frozen = jlora.split(tiny.lora)[1]
  jb = {k: jnp.asarray(v) for k, v in (("ids", ids), ("attn", attn), ("comp", comp))}

  def logps(adapters):
    return ob.model_token_logprobs(tiny.model, jlora.combine(adapters, frozen), jb["ids"], jb["comp"],
                                   attention_mask=jb["attn"], chunk_size=CHUNK, temperature=TEMPERATURE)

  f = jax.jit(logps)
  vjps = {}
  for name, lp in (("a0", tiny.lora), ("a1", a1)):
    out, vjp = jax.vjp(f, jlora.split(lp)[0])
    vjps[name] = (out, lambda ct, vjp=vjp: vjp(ct)[0])
  ref = jax.jit(lambda: ob.model_token_logprobs(tiny.model, tiny.lora, jb["ids"], jb["comp"], attention_mask=jb["attn"],
                                                chunk_size=CHUNK, temperature=TEMPERATURE, reference=True))()
  trainer, pm = _trainer(tiny, prompts, tmp_path_factory.mktemp("trl"))
  return dict(side=side, prompts=prompts, completions=completions, vjps=vjps, ref=ref, trainer=trainer, pm=pm,
              a1_dir=a1_dir)


def _trainer(tiny, prompts, out):
  base = transformers.AutoModelForCausalLM.from_pretrained(tiny.directory)
  pm = peft.PeftModel.from_pretrained(base, tiny.peft_dir, is_trainable=True)
  ds = datasets.Dataset.from_dict({"prompt": ["a", "b"], "a": [0.0, 0.0], "b": [0.0, 0.0]})
  import os

  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(jlora.__file__), "assets", "tiny-base"))
  args = trl.GRPOConfig(output_dir=str(out), report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                        per_device_train_batch_size=2 * G, num_generations=G, max_completion_length=C,
                        temperature=TEMPERATURE, beta=0.04, reward_weights=WEIGHTS, gradient_accumulation_steps=1)
  trainer = trl.GRPOTrainer(model=pm, reward_funcs=[reward_a, reward_b], args=args, train_dataset=ds,
                            processing_class=tok)
  if "ref" in pm.peft_config:  # the reference is the base (adapter disabled), as jlora's
    pm.delete_adapter("ref")
  assert list(pm.peft_config) == ["default"]
  pm.train()
  trainer.current_gradient_accumulation_steps = 1
  return trainer, pm


def _load_adapter(pm, directory):
  from safetensors.torch import load_file

  peft.set_peft_model_state_dict(pm, load_file(f"{directory}/adapter_model.safetensors"))


def _grad_errors(tiny, pm, grads) -> float:
  named = dict(pm.named_parameters())
  worst = 0.0
  for path, w in jlora._checkpoint.adapter_weights(grads).items():
    for layer in range(w.a.shape[0]):
      module = tiny.model.module_map.to_module(path, (layer,))
      for factor, ours in (("lora_A", w.a[layer]), ("lora_B", w.b[layer])):
        theirs = named[f"base_model.model.{module}.{factor}.default.weight"].grad.numpy()
        assert np.abs(theirs).max() > 0
        worst = max(worst, float(np.abs(np.asarray(ours).T - theirs).max()) / float(np.abs(theirs).max()))
  return worst


def _per_token(x, mask) -> list[np.ndarray]:
  """Each row's values at its masked positions, in order (TRL and jlora pad differently)."""
  x, mask = np.asarray(x), np.asarray(mask).astype(bool)
  return [x[i][mask[i]] for i in range(x.shape[0])]


def _max_diff(a, b) -> float:
  """Largest |a − b| relative to the largest |b|."""
  scale = max(float(np.abs(v).max()) for v in b)
  return max(float(np.abs(u - v).max()) for u, v in zip(a, b)) / scale


CONFIGS = [  # (loss_type, importance_sampling_level, scale_rewards, beta, num_iterations, epsilon, epsilon_high)
    ("grpo", "token", "group", 0.0, 1, 0.2, None),
    ("bnpo", "token", "batch", 0.0, 1, 0.2, None),
    ("dr_grpo", "token", "none", 0.0, 1, 0.2, None),
    ("dapo", "token", "group", 0.0, 1, 0.2, 0.28),
    ("dapo", "token", "group", 0.04, 1, 0.2, None),  # beta > 0: the k3 KL to the base, times the ratio
    ("grpo", "sequence", "group", 0.0, 2, 3e-4, 4e-4),  # GSPO's recipe, a second iteration: clipped
    ("dapo", "token", "group", 0.04, 2, 0.2, 0.28),  # a second iteration with beta > 0: clipped
]


@pytest.mark.parametrize("loss_type,level,scale,beta,mu,eps,eps_high", CONFIGS)
def test_grpo_against_trl(tiny, setup, loss_type, level, scale, beta, mu, eps, eps_high):
  trainer, pm, side = setup["trainer"], setup["pm"], setup["side"]
  trainer.loss_type, trainer.importance_sampling_level, trainer.scale_rewards = loss_type, level, scale
  trainer.beta, trainer.num_iterations, trainer.epsilon_low = beta, mu, eps
  trainer.epsilon_high = eps if eps_high is None else eps_high
  _load_adapter(pm, tiny.peft_dir)
  prompts, completions = setup["prompts"], setup["completions"]
  texts = [f"c{i}" for i in range(2 * G)]
  trainer._generate = lambda ps: ([prompts[i // G] for i in range(2 * G)], completions, None, texts, None, {}, None,
                                  None)
  inputs = [{"prompt": "ab"[i // G], "a": REWARDS_A[i], "b": REWARDS_B[i]} for i in range(2 * G)]
  with torch.no_grad():
    scored = trainer._generate_and_score_completions(inputs)
  if mu > 1:  # the loss of the next optimizer step: another adapter than the rollout's
    _load_adapter(pm, setup["a1_dir"])
  pm.zero_grad(set_to_none=True)
  their_loss = trainer._compute_loss(pm, scored)
  their_loss.backward()
  their = {k: v[-1] for k, v in trainer._metrics["train"].items()}
  their_mask = scored["completion_mask"].numpy()

  # jlora: the same rows, rewards -> advantages -> loss, gradients through the log-prob pass's VJP.
  rewards = np.asarray(REWARDS_A) * WEIGHTS[0] + np.asarray(REWARDS_B) * WEIGHTS[1]
  adv = ob.grpo_advantages(rewards, num_generations=G, scale_rewards=scale)
  np.testing.assert_allclose(np.asarray(adv), scored["advantages"].numpy(), rtol=1e-5, atol=1e-6)
  reward_metrics = ob.grpo_reward_metrics(np.stack([REWARDS_A, REWARDS_B], 1), num_generations=G,
                                          names=["reward_a", "reward_b"], weights=WEIGHTS, scale_rewards=scale)
  assert set(reward_metrics) <= set(their)
  for k, v in reward_metrics.items():
    np.testing.assert_allclose(v, their[k], rtol=1e-6, atol=1e-7, err_msg=k)
  old_logps = setup["vjps"]["a0"][0]
  logps, vjp = setup["vjps"]["a1" if mu > 1 else "a0"]
  ref = setup["ref"] if beta > 0 else None
  pos = jnp.asarray(side.pos)

  def loss_fn(lp):
    total, count, metrics = ob.grpo_loss_terms(lp, adv, pos, old_logps=old_logps if mu > 1 else None, ref_logps=ref,
                                               loss_type=loss_type, epsilon=eps, epsilon_high=eps_high, beta=beta,
                                               importance_sampling_level=level, max_completion_length=C)
    return total / jnp.maximum(count, 1.0), metrics

  (loss, metrics), ct = jax.value_and_grad(loss_fn, has_aux=True)(logps)
  grads = vjp(ct)

  # Per-token log-probs: the policy's (TRL's fused head at the same temperature), the old policy's, the reference's.
  with torch.no_grad():
    full_ids = torch.cat([scored["prompt_ids"], scored["completion_ids"]], 1)
    full_attn = torch.cat([scored["prompt_mask"], scored["completion_mask"]], 1)
    their_logps = trainer._get_per_token_logps_and_entropies(pm, full_ids, full_attn, scored["completion_ids"].size(1))[0]
  diffs = {"logps": _max_diff(_per_token(logps, side.pos), _per_token(their_logps.numpy(), their_mask))}
  if mu > 1:
    diffs["old"] = _max_diff(_per_token(old_logps, side.pos), _per_token(scored["old_per_token_logps"], their_mask))
  if beta > 0:
    diffs["ref"] = _max_diff(_per_token(ref, side.pos), _per_token(scored["ref_per_token_logps"], their_mask))
  grad_err = _grad_errors(tiny, pm, grads)
  their_loss = float(their_loss.detach())
  loss_abs = abs(float(loss) - their_loss)
  shared = sorted(k for k in their if k in metrics)
  metric_diff = max(abs(float(metrics[k]) - float(their[k])) for k in shared)
  print(f"\nTRL parity GRPO {loss_type} {level} scale={scale} beta={beta} mu={mu}: loss {their_loss:.6g} (diff "
        f"{loss_abs:.1e}); log-probs max diff rel {diffs}; LoRA grads max diff rel {grad_err:.1e}; metrics {shared} max "
        f"diff {metric_diff:.1e}")
  assert all(d < LOGP_RTOL for d in diffs.values()), diffs
  assert loss_abs <= LOSS_RTOL * max(abs(their_loss), 1e-3)
  assert grad_err < GRAD_RTOL
  for k in shared:
    np.testing.assert_allclose(float(metrics[k]), float(their[k]), rtol=1e-5, atol=1e-6, err_msg=k)
  assert {"clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean"} <= set(shared)
  assert ("kl" in shared) == (beta > 0)
  if mu > 1:
    assert float(metrics["clip_ratio/region_mean"]) > 0  # the clipping is active
