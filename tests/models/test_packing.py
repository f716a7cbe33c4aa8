"""Packed rows with segment ids, and the KV cache, against unpacked / uncached forwards."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from families import IDS


@pytest.mark.parametrize("name", ["mistral", "gemma2"])  # sliding window; soft-capped XLA attention
def test_packed_examples_do_not_see_each_other(family, name):
  f = family(name)
  fwd = f.forward
  lengths = [5, 4, 3]  # three examples packed into each 12-token row
  segments = jnp.asarray(np.repeat(np.arange(1, 4), lengths)[None].repeat(2, 0))
  packed = np.asarray(fwd(f.params, jnp.asarray(IDS), segment_ids=segments))
  # Each example alone: its own row, right-padded to the same length (one compiled shape).
  starts = np.cumsum([0, *lengths[:-1]])
  alone_ids = np.zeros((6, 12), IDS.dtype)
  alone_mask = np.zeros((6, 12), np.int32)
  for j, (s, n) in enumerate(zip(starts, lengths)):
    alone_ids[2 * j:2 * j + 2, :n] = IDS[:, s:s + n]
    alone_mask[2 * j:2 * j + 2, :n] = 1
  alone = np.asarray(fwd(f.params, jnp.asarray(alone_ids), attention_mask=jnp.asarray(alone_mask)))
  for j, (s, n) in enumerate(zip(starts, lengths)):
    want = alone[2 * j:2 * j + 2, :n]
    # Same computation per example, other XLA shapes: float32 summation order only.
    np.testing.assert_allclose(packed[:, s:s + n], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # With one segment per row the later examples do attend to the earlier ones.
  crossing = np.asarray(fwd(f.params, jnp.asarray(IDS), segment_ids=jnp.ones_like(segments)))
  assert np.abs(crossing[:, 5:] - packed[:, 5:]).max() > 1e-2


@pytest.mark.parametrize("name", ["gemma3"])  # mixed local/global layers with their own RoPE
def test_kv_cache_prefill_and_decode_equal_the_full_forward(family, name):
  f = family(name)
  full = np.asarray(f.forward(f.params, jnp.asarray(IDS)))
  step = jax.jit(lambda p, ids, cache: f.model(p, ids, cache=cache))
  cache = f.model.init_cache(2, 16)
  logits, cache = step(f.params, jnp.asarray(IDS[:, :8]), cache)  # prefill 8 (window 5 < 8)
  got = [np.asarray(logits)]
  for t in range(8, 12):  # then one token at a time
    logits, cache = step(f.params, jnp.asarray(IDS[:, t:t + 1]), cache)
    got.append(np.asarray(logits))
  assert int(cache["length"]) == 12 and np.asarray(cache["next_position"]).tolist() == [12, 12]
  np.testing.assert_allclose(np.concatenate(got, 1), full, rtol=1e-5, atol=1e-5 * np.abs(full).max())


def test_segment_ids_with_a_cache_is_an_error(family):
  f = family("llama2")
  with pytest.raises(ValueError, match="segment_ids cannot be used with a KV cache"):
    f.model(f.params, jnp.asarray(IDS), segment_ids=jnp.ones_like(jnp.asarray(IDS)), cache=f.model.init_cache(2, 16))


def test_unrolled_layers_compute_the_same(family):
  f = family("gemma3")  # mixed layer kinds: the per-layer selection must survive unrolling
  unrolled = dataclasses.replace(f.model, unroll_layers=True)
  want = np.asarray(f.forward(f.params, jnp.asarray(IDS)))
  got = np.asarray(jax.jit(unrolled.__call__)(f.params, jnp.asarray(IDS)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())  # fusion order only
