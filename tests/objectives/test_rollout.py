"""Rollouts and the generator's sampling options on the bundled base: greedy rollouts are ``generate``'s,
sampled ones are reproducible from the key, top-k, stop sequences and stop strings end rows where they say,
and the GRPO functions refuse bad input with errors that say what to pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randomize

import jlora
import jlora.models
from jlora import objectives as ob
from jlora.models.generate import generate_tokens, sample_token


@pytest.fixture(scope="module")
def base():
  from transformers import AutoTokenizer

  model, params = jlora.models.load(jlora.models.TINY_BASE)
  cfg = jlora.LoraConfig(rank=2, targets=model.targets("all-linear"))
  lora = randomize(jlora.init(jax.random.key(0), params, cfg, layout=model.layout), jax.random.key(1), scale=0.05)
  tok = AutoTokenizer.from_pretrained(jlora.models.TINY_BASE)
  prompts = [tok("Reverse the words: rule list node\nAnswer:", add_special_tokens=False)["input_ids"],
             tok("Reverse the words: a b\nAnswer:", add_special_tokens=False)["input_ids"]]
  return model, lora, tok, prompts


def test_greedy_rollouts_are_generates_and_need_no_merge(base):
  model, lora, tok, prompts = base
  r = ob.rollout(model, lora, prompts, num_generations=2, max_new_tokens=12, key=jax.random.key(0), temperature=0.0,
                 tokenizer=tok)
  want = jlora.models.generate(model, lora, prompts, max_new_tokens=12)
  assert want == jlora.models.generate(model, jlora.merge(lora), prompts, max_new_tokens=12)
  eos = model.config.eos_token_ids
  for i, ids in enumerate(r.completion_ids):
    ended = bool(ids) and ids[-1] in eos
    assert (ids[:-1] if ended else ids) == want[i // 2]
    assert r.truncated[i] == (not ended)
    assert r.completions[i] == tok.decode(ids, skip_special_tokens=True)
  # The rows: the prompt left-padded to P columns, then the completion; masks mark what is there.
  p = r.prompt_length
  assert r.input_ids.shape == (4, p + 12) and p % 8 == 0
  for i, ids in enumerate(r.completion_ids):
    n = len(prompts[i // 2])
    assert r.input_ids[i, p - n:p].tolist() == prompts[i // 2] and r.attention_mask[i, :p - n].sum() == 0
    assert r.input_ids[i, p:p + len(ids)].tolist() == ids and r.completion_mask[i].sum() == len(ids)
    assert r.completion_mask[i, p:p + len(ids)].all() and r.attention_mask[i, p + len(ids):].sum() == 0


def test_sampled_rollouts_are_reproducible_from_the_key(base):
  model, lora, tok, prompts = base
  kw = dict(num_generations=4, max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=50)
  a = ob.rollout(model, lora, prompts, key=jax.random.key(5), **kw)
  b = ob.rollout(model, lora, prompts, key=jax.random.key(5), **kw)
  c = ob.rollout(model, lora, prompts, key=jax.random.key(6), **kw)
  np.testing.assert_array_equal(a.input_ids, b.input_ids)
  assert not np.array_equal(a.input_ids, c.input_ids)
  assert len({tuple(x) for x in a.completion_ids}) > 1  # the G completions of a prompt differ
  # top_k = 1 samples the argmax: greedy.
  greedy = ob.rollout(model, lora, prompts, num_generations=1, max_new_tokens=12, key=jax.random.key(0),
                      temperature=0.0)
  top1 = ob.rollout(model, lora, prompts, num_generations=1, max_new_tokens=12, key=jax.random.key(9),
                    temperature=1.0, top_p=0.95, top_k=1)
  np.testing.assert_array_equal(greedy.input_ids, top1.input_ids)


def test_top_k_keeps_the_k_most_likely_tokens():
  logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]] * 4000))
  draws = np.asarray(jax.jit(sample_token, static_argnames=("temperature", "top_p", "top_k"))(
      logits, jax.random.key(0), temperature=1.0, top_p=1.0, top_k=2))
  assert set(draws.tolist()) == {0, 1}
  assert abs(np.mean(draws == 0) - 0.4 / 0.7) < 0.03  # renormalised over the two kept


def test_stop_sequences_and_strings_end_rows(base):
  model, lora, tok, prompts = base
  free = jlora.models.generate(model, lora, prompts[:1], max_new_tokens=12, eos_id=())[0]
  stop = free[3:5]
  first = next(i for i in range(len(free) - 1) if free[i:i + 2] == stop)
  got = jlora.models.generate(model, lora, prompts[:1], max_new_tokens=12, eos_id=(), stop_ids=[[999], stop])[0]
  assert got == free[:first + 2]  # kept, as Hugging Face keeps a stop string
  ids, mask = ob.pad_prompts(prompts[:1], num_generations=1)
  g = generate_tokens(model, lora, ids, mask, max_new_tokens=12, eos_id=(), stop_ids=[stop])
  assert g.lengths.tolist() == [first + 2] and g.ended.tolist() == [True]
  # A stop string: the completion ends with the token that completes it in the decoded text.
  text = tok.decode(free)
  word = text.split()[1] if len(text.split()) > 1 else text.strip()
  r = ob.rollout(model, lora, prompts[:1], num_generations=1, max_new_tokens=12, key=jax.random.key(0),
                 temperature=0.0, eos_id=(), stop=[word], tokenizer=tok)
  (out,) = r.completion_ids
  assert word in tok.decode(out) and word not in tok.decode(out[:-1])
  assert out == free[:len(out)] and not r.truncated[0]
  with pytest.raises(ValueError, match="stop string 'x' needs tokenizer="):
    ob.rollout(model, lora, prompts, num_generations=1, max_new_tokens=2, key=jax.random.key(0), stop=["x"])
  with pytest.raises(ValueError, match="stop sequence must be a non-empty list of token ids"):
    jlora.models.generate(model, lora, prompts, max_new_tokens=2, stop_ids=[[]])
  with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
    jlora.models.generate(model, lora, prompts, max_new_tokens=2, top_k=-1)
  with pytest.raises(ValueError, match="does not fit prompt_length=4"):
    ob.rollout(model, lora, prompts, num_generations=1, max_new_tokens=2, key=jax.random.key(0), prompt_length=4)


def test_grpo_functions_refuse_bad_input():
  lp, mask, adv = jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.zeros((2,))
  with pytest.raises(ValueError, match="unknown loss_type 'ppo'"):
    ob.grpo_loss(lp, adv, mask, loss_type="ppo")
  with pytest.raises(ValueError, match="beta=0.1 weighs a KL to the reference: pass ref_logps"):
    ob.grpo_loss(lp, adv, mask, beta=0.1)
  with pytest.raises(ValueError, match="dr_grpo' divides by rows × max_completion_length"):
    ob.grpo_loss(lp, adv, mask, loss_type="dr_grpo")
  with pytest.raises(ValueError, match=r"advantages must be \(rows,\) = \(2,\)"):
    ob.grpo_loss(lp, jnp.zeros((3,)), mask)
  with pytest.raises(ValueError, match="one shape"):
    ob.grpo_loss(lp, adv, jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="epsilon must be a positive number"):
    ob.grpo_loss(lp, adv, mask, epsilon=0.0)
  with pytest.raises(ValueError, match="N a multiple of num_generations=2"):
    ob.grpo_advantages([1.0, 2.0, 3.0], num_generations=2)
  with pytest.raises(ValueError, match="num_generations must be an integer >= 2"):
    ob.grpo_advantages([1.0, 2.0], num_generations=1)
  with pytest.raises(ValueError, match="unknown scale_rewards 'std'"):
    ob.grpo_advantages([1.0, 2.0], num_generations=2, scale_rewards="std")


def test_one_sequence_rows_and_dynamic_groups_count_nothing():
  """A row without tokens (a dropped group) adds nothing to any loss type's total or count."""
  lp = jnp.log(jnp.array([[0.5, 0.5], [0.25, 1.0], [0.1, 0.1]]))
  mask = jnp.array([[1, 1], [1, 0], [0, 0]])
  adv = jnp.array([1.0, -1.0, 5.0])
  for loss_type in ob.GRPO_LOSS_TYPES:
    full = ob.grpo_loss_terms(lp, adv, mask, loss_type=loss_type, max_completion_length=2)
    kept = ob.grpo_loss_terms(lp[:2], adv[:2], mask[:2], loss_type=loss_type, max_completion_length=2)
    assert float(full[0]) == pytest.approx(float(kept[0])) and float(full[1]) == float(kept[1]), loss_type


def test_docs_grpo_loop_runs_and_trains_the_adapters():
  """docs/objectives.md's GRPO loop runs as written, and its steps move the adapters (B starts at 0)."""
  import os
  import re

  with open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "objectives.md")) as f:
    text = f.read()
  section = text.split("## Reinforcement learning: GRPO and its variants", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  scope: dict = {}
  exec(compile(code, "docs/objectives.md GRPO loop", "exec"), scope)
  assert np.isfinite(float(scope["value"]))
  bs = [w.b for w in jax.tree.leaves(scope["adapters"], is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
        if isinstance(w, jlora.LoraWeight)]
  assert bs and any(float(np.abs(np.asarray(b)).max()) > 0 for b in bs)
