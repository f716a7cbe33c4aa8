"""Every family against PyTorch transformers: logits (float32, bfloat16), greedy generation, save."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jlora.models
from families import IDS, PROMPTS, torch_greedy
from families import FAMILIES

NAMES = list(FAMILIES)


def _rel_err(got, want) -> float:
  return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("name", NAMES)
def test_float32_logits_match_transformers(family, name):
  f = family(name)
  fwd = f.forward
  # float32 on both sides; summation orders differ, which moves 3-layer logits by ~1e-6 of their
  # scale. 1e-4 leaves room without hiding a bug: a wrong RoPE variant, norm, scale, window or
  # soft-cap moves them by more than 1e-2.
  assert _rel_err(fwd(f.params, jnp.asarray(IDS)), f.torch_logits()) < 1e-4
  # Padding: row 0 right-padded, row 1 left-padded; compared on real tokens. transformers counts
  # positions from the first column unless given position_ids (as generate does).
  mask = np.ones_like(IDS)
  mask[0, 9:] = 0
  mask[1, :4] = 0
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  want = f.torch_logits(attention_mask=torch.as_tensor(mask), position_ids=torch.as_tensor(pos))
  got = np.asarray(fwd(f.params, jnp.asarray(IDS), attention_mask=jnp.asarray(mask)))
  real = mask.astype(bool)
  assert _rel_err(got[real], want[real]) < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_logits_are_as_accurate_as_transformers(family, name):
  f = family(name)
  model, params = jlora.models.load(f.directory, dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
  got = np.asarray(jax.jit(model.__call__)(params, jnp.asarray(IDS))).astype(np.float32)
  exact = f.torch_logits()
  tm16 = transformers.AutoModelForCausalLM.from_pretrained(f.directory, dtype=torch.bfloat16,
                                                           attn_implementation=FAMILIES[name][2]).eval()
  with torch.no_grad():
    torch_bf16 = tm16(torch.as_tensor(IDS)).logits.float().numpy()
  # bf16 has an 8-bit mantissa: both implementations round differently (e.g. jlora keeps
  # attention logits in float32), so they cannot agree bit for bit. The meaningful bound is
  # accuracy: jlora's bf16 logits must be about as close to the float32 truth as transformers'
  # own bf16 logits (within 1.5x, plus 0.5% of the logit scale for rounding luck).
  ours, theirs = _rel_err(got, exact), _rel_err(torch_bf16, exact)
  assert ours < 1.5 * theirs + 5e-3, (ours, theirs)
  assert _rel_err(got, torch_bf16) < 0.1


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_matches_transformers(family, name):
  f = family(name)
  prompts = PROMPTS
  want = torch_greedy(f.torch_model, prompts, max_new_tokens=10)
  assert jlora.models.generate(f.model, f.params, prompts, max_new_tokens=10, eos_id=()) == want
  if name in ("mistral", "gemma3"):  # sliding windows: the cases where positions vs slots matter
    # Right padding gives the same tokens (positions and masks follow the real tokens).
    assert jlora.models.generate(f.model, f.params, prompts, max_new_tokens=10, eos_id=(), padding="right") == want
    # Stopping: the end id ends a row early and is not returned (same compiled loop as above).
    eos = want[0][3]
    got = jlora.models.generate(f.model, f.params, prompts, max_new_tokens=10, eos_id=eos, padding="right")
    assert got[0] == want[0][: want[0].index(eos)]


@pytest.mark.parametrize("name", NAMES)
def test_save_round_trips_and_loads_in_transformers(family, name, tmp_path):
  f = family(name)
  d = jlora.models.save(str(tmp_path / "f32"), f.model, f.params)
  model, params = jlora.models.load(d)
  assert model == f.model
  jax.tree.map(np.testing.assert_array_equal, params, f.params)  # bit for bit
  tm = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation=FAMILIES[name][2]).eval()
  with torch.no_grad():
    got = tm(torch.as_tensor(IDS)).logits.numpy()
  np.testing.assert_array_equal(got, f.torch_logits())  # the very same weights
  # bfloat16 is written as bfloat16 and read back by transformers exactly.
  model16, params16 = jlora.models.load(f.directory, dtype="bfloat16")
  d16 = jlora.models.save(str(tmp_path / "bf16"), model16, params16)
  tm16 = transformers.AutoModelForCausalLM.from_pretrained(d16, dtype=torch.bfloat16)
  ref16 = {k: v.to(torch.bfloat16) for k, v in f.torch_model.state_dict().items()}
  for k, v in tm16.state_dict().items():
    assert v.dtype == torch.bfloat16
    assert torch.equal(v, ref16[k]), k
  back16 = jlora.models.load(d16, dtype="bfloat16")[1]
  jax.tree.map(np.testing.assert_array_equal, back16, params16)
