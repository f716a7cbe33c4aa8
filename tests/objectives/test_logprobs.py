"""Chunked token log-probs: equal to materialised logits (values and gradients), no (B, T, V) value anywhere."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from helpers import command_env, randomize
from jlora import objectives as ob
from jlora.models import Decoder, ModelConfig

B, T, V = 2, 9, 96
F32 = dict(rtol=2e-5, atol=2e-5)

CONFIGS = {
    # Llama: untied lm_head
    "llama": dict(model_type="llama", num_key_value_heads=2),
    # Gemma 2 style: tied embedding, final-logit soft-cap, sandwich norms
    "gemma2": dict(model_type="gemma2", head_dim=8, final_logit_softcapping=2.0, query_pre_attn_scalar=8),
}


@dataclasses.dataclass
class Setup:
  model: Decoder
  lora: dict
  ids: jax.Array
  labels: jax.Array
  hidden: jax.Array  # the wrapped model's hidden states for ``ids``


@pytest.fixture(scope="module", params=list(CONFIGS))
def setup(request) -> Setup:
  cfg = ModelConfig.from_hf({"vocab_size": V, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                             "num_attention_heads": 4, **CONFIGS[request.param]})
  model = Decoder(cfg)
  lcfg = jlora.LoraConfig(rank=4, alpha=8, targets=model.targets("all-linear"))
  ids = jax.random.randint(jax.random.key(1), (B, T), 0, V)

  def make(key):
    k1, k2, k3 = jax.random.split(key, 3)
    params = model.init(k1, stddev=0.3)
    lora = randomize(jlora.init(k2, params, lcfg, layout=model.layout), k3, scale=0.3)
    return lora, jlora.wrap(model.hidden_states)(lora, ids)

  lora, hidden = jax.jit(make)(jax.random.key(0))
  mask = np.ones((B, T), int)
  mask[0, :3] = 0  # a prompt
  mask[1, :6] = 0  # a longer prompt: the first chunk after sorting mixes rows
  return Setup(model, lora, ids, ob.next_token_labels(ids, jnp.asarray(mask)), hidden)


def _assert_tree_close(got, want, **tol):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), **tol)


def _weighted(tok):
  return -jnp.sum(tok * jnp.arange(1.0, T + 1.0))  # position weights: every cotangent differs


@pytest.mark.parametrize("chunk_size,temperature", [(1, 1.0), (4, 0.7), (64, 1.0)])
def test_chunked_equals_full_values_and_gradients(setup, chunk_size, temperature):
  s = setup
  head = s.model.head(s.lora)  # plain array: the layers are adapted, the head is not
  assert not isinstance(head.weight, jlora.LoraWeight)

  def run(fn):
    def loss(h, w):
      tok = fn(h, dataclasses.replace(head, weight=w), s.labels)
      return _weighted(tok), tok
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(s.hidden, head.weight)

  (l1, tok1), g1 = run(lambda h, hd, l: ob.token_logprobs(h, hd, l, chunk_size=chunk_size, temperature=temperature))
  (l2, tok2), g2 = run(lambda h, hd, l: ob.token_logprobs_full(h, hd, l, temperature=temperature))
  np.testing.assert_allclose(tok1, tok2, **F32)
  assert not np.asarray(tok1)[np.asarray(s.labels) < 0].any()  # unsupervised positions: exactly 0
  assert np.asarray(tok1)[np.asarray(s.labels) >= 0].max() < 0
  np.testing.assert_allclose(l1, l2, rtol=2e-6)
  _assert_tree_close(g1, g2, **F32)  # w.r.t. the hidden states (frozen-head path) and the head kernel


@pytest.mark.parametrize("setup", ["gemma2"], indirect=True)  # tied embedding and soft-cap: the harder model
def test_chunked_equals_full_through_the_model(setup):
  s = setup
  adapters, frozen = jlora.split(s.lora)

  def loss(tokens_fn, a):
    params = jlora.combine(a, frozen)
    hidden = jlora.wrap(s.model.hidden_states)(params, s.ids)
    return _weighted(tokens_fn(hidden, s.model.head(params), s.labels))

  g1 = jax.jit(jax.grad(lambda a: loss(lambda *x: ob.token_logprobs(*x, chunk_size=4, temperature=0.7), a)))(adapters)
  g2 = jax.jit(jax.grad(lambda a: loss(lambda *x: ob.token_logprobs_full(*x, temperature=0.7), a)))(adapters)
  _assert_tree_close(g1, g2, rtol=1e-4, atol=1e-5 * max(float(np.abs(x).max()) for x in jax.tree.leaves(g2)))


def test_softcap_and_temperature_are_applied(setup):
  s = setup
  head = s.model.head(s.lora)
  logits = head(s.hidden).astype(jnp.float32) / 0.7  # the model's own (soft-capped) logits: Decoder.__call__
  want = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.maximum(s.labels, 0)[..., None], -1)[..., 0]
  got = jax.jit(lambda h: ob.token_logprobs(h, head, s.labels, chunk_size=5, temperature=0.7))(s.hidden)
  np.testing.assert_allclose(got, jnp.where(s.labels >= 0, want, 0.0), **F32)


def _vocab_shaped(jaxpr, n_rows: int) -> list:
  """Every value of ``jaxpr`` (nested jaxprs included) with ``n_rows`` or more rows of vocabulary size."""
  found = []

  def visit(jp):
    for eqn in jp.eqns:
      for v in eqn.outvars:
        shape = getattr(v.aval, "shape", ())
        if len(shape) >= 2 and shape[-1] == V and int(np.prod(shape[:-1])) >= n_rows:
          found.append((eqn.primitive.name, shape))
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (list, tuple)) else [p]):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            visit(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            visit(sub)

  visit(jaxpr.jaxpr)
  return found


def test_no_logits_sized_value_in_forward_or_backward(setup):
  s = setup
  adapters, frozen = jlora.split(s.lora)

  def loss(fn, a):
    params = jlora.combine(a, frozen)
    return -jnp.sum(fn(jlora.wrap(s.model.hidden_states)(params, s.ids), s.model.head(params), s.labels))

  chunk = 4
  chunked = jax.make_jaxpr(jax.grad(lambda a: loss(lambda h, hd, l: ob.token_logprobs(h, hd, l, chunk_size=chunk), a)))
  full = jax.make_jaxpr(jax.grad(lambda a: loss(ob.token_logprobs_full, a)))
  # The check finds the logits where they are: (B·T, V) in the materialised version.
  assert _vocab_shaped(full(adapters), B * T)
  # Chunked: nothing with more than a chunk's rows of vocabulary size, forward or backward.
  assert not _vocab_shaped(chunked(adapters), chunk + 1)
  # The VJP keeps no (chunk, V) block either: its residuals have no vocabulary axis but the head's.
  vjp = jax.eval_shape(lambda a: jax.vjp(lambda a: loss(lambda h, hd, l: ob.token_logprobs(h, hd, l, chunk_size=chunk),
                                                        a), a)[1], adapters)
  vocab_residuals = {tuple(r.shape) for r in jax.tree.leaves(vjp) if hasattr(r, "shape") and V in r.shape}
  assert vocab_residuals <= {(V, 32), (32, V)}, vocab_residuals


def test_head_gradient_when_only_the_kernel_is_differentiated():
  k = jax.random.split(jax.random.key(3), 3)
  hidden = jax.random.normal(k[0], (B, T, 16))
  labels = jnp.where(jax.random.uniform(k[2], (B, T)) < 0.3, -100, jax.random.randint(k[1], (B, T), 0, 40))
  w = jax.random.normal(k[1], (40, 16))  # a tied table

  def loss(fn, w):
    return _weighted(fn(hidden, ob.Head(w, transposed=True, softcap=5.0), labels))

  want = jax.jit(jax.grad(lambda w: loss(ob.token_logprobs_full, w)))(w)
  got = jax.jit(jax.grad(lambda w: loss(lambda *a: ob.token_logprobs(*a, chunk_size=5), w)))(w)
  np.testing.assert_allclose(got, want, **F32)


@pytest.mark.parametrize("transposed", [False, True])
def test_adapted_head_is_served_unmerged(transposed):
  # An adapted lm_head (D, V), or an adapted tied embedding table (V, D) used as the head.
  d = 16
  k = jax.random.split(jax.random.key(5), 4)
  table = {"w": jax.random.normal(k[0], (V, d) if transposed else (d, V))}
  layout = {"w": jlora.KernelLayout(in_axes=(0,), embedding=transposed)}
  lora = jax.jit(lambda t: randomize(jlora.init(k[1], t, jlora.LoraConfig(rank=4, alpha=8, targets="w"),
                                                layout=layout), k[2], scale=0.3))(table)
  head = ob.Head(lora["w"], transposed=transposed, softcap=4.0)
  with pytest.raises(ValueError, match="Head.kernel: the head weight is a LoraWeight"):
    _ = head.kernel
  hidden = jax.random.normal(k[3], (B, T, d))
  labels = ob.next_token_labels(jax.random.randint(k[3], (B, T), 0, V))
  adapters, frozen = jlora.split(lora)

  def run(fn):
    def loss(h, a):
      tok = fn(h, dataclasses.replace(head, weight=jlora.combine(a, frozen)["w"]), labels)
      return _weighted(tok), tok
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(hidden, adapters)

  (_, tok1), g1 = run(lambda *x: ob.token_logprobs(*x, chunk_size=4))
  (_, tok2), g2 = run(ob.token_logprobs_full)
  np.testing.assert_allclose(tok1, tok2, **F32)
  _assert_tree_close(g1, g2, **F32)
  # the adapter matters, and is applied as W0 + scale·A⊗B
  dense = ob.Head(jlora.merge(lora)["w"], transposed=transposed, softcap=4.0)
  np.testing.assert_allclose(tok1, ob.token_logprobs_full(hidden, dense, labels), **F32)
  assert np.abs(np.asarray(tok1 - ob.token_logprobs_full(hidden, dataclasses.replace(dense, weight=table["w"]),
                                                          labels))).max() > 1e-2


def test_a_batch_split_over_devices_stays_split():
  # 4 fake CPU devices, rows sharded over them: each device computes the logits of its own rows.
  script = os.path.join(os.path.dirname(__file__), "sharded_check.py")
  proc = subprocess.run([sys.executable, script], env=command_env(devices=4), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  b, t, d, v = 8, 64, 32, 1024
  # per device: a quarter of the 4·B·T·D·V FLOPs (plain autodiff of the sharded full logits does the same)
  assert r["chunked"]["flops"] == pytest.approx(r["full"]["flops"], rel=0.05)
  assert r["chunked"]["flops"] < 4 * b * t * d * v / 4 * 1.1
  # the block of logits: the 2 rows of the 8 on each device
  assert f"2,{t},{v}" in r["chunked"]["dots"] or f"{2 * t},{v}" in r["chunked"]["dots"], r


def test_under_checkpoint_and_vmap():
  # The fine-tuning step may checkpoint a whole micro-batch loss (jax.checkpoint around the custom VJP).
  k = jax.random.split(jax.random.key(8), 3)
  hidden = jax.random.normal(k[0], (B, T, 16))
  head = ob.Head(jax.random.normal(k[1], (16, 40)), softcap=3.0)
  labels = jnp.where(jax.random.uniform(k[2], (B, T)) < 0.3, -100, jax.random.randint(k[2], (B, T), 0, 40))
  f = lambda h: _weighted(ob.token_logprobs(h, head, labels, chunk_size=4))
  want = jax.jit(jax.grad(f))(hidden)
  policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  np.testing.assert_allclose(jax.jit(jax.grad(jax.checkpoint(f, policy=policy)))(hidden), want, **F32)
  # one example at a time (vmap over the batch) gives the same gradients
  per_row = jax.vmap(jax.grad(lambda h, l: _weighted(ob.token_logprobs(h[None], head, l[None], chunk_size=4))))
  np.testing.assert_allclose(jax.jit(per_row)(hidden, labels), want, **F32)


def test_bfloat16_hidden_and_head():
  k = jax.random.split(jax.random.key(7), 3)
  hidden = jax.random.normal(k[0], (B, T, 16))
  w = jax.random.normal(k[1], (16, 40)) / 4
  labels = jax.random.randint(k[2], (B, T), 0, 40)

  def grads(h, w):
    f = lambda h, w: _weighted(ob.token_logprobs(h, ob.Head(w), labels, chunk_size=4))
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, w)

  (l16, (gh16, gw16)), (l32, (gh32, gw32)) = grads(hidden.astype(jnp.bfloat16), w.astype(jnp.bfloat16)), grads(
      hidden, w)
  assert gh16.dtype == gw16.dtype == jnp.bfloat16  # cotangents in the primal dtypes
  # logits accumulate in float32 (no bfloat16 logits): the loss is as close as bf16 inputs allow
  np.testing.assert_allclose(float(l16), float(l32), rtol=2e-2)
  np.testing.assert_allclose(np.asarray(gh16, np.float32), gh32, rtol=0.1, atol=0.05 * float(np.abs(gh32).max()))
  np.testing.assert_allclose(np.asarray(gw16, np.float32), gw32, rtol=0.1, atol=0.05 * float(np.abs(gw32).max()))


def test_nothing_supervised_gives_zeros_and_zero_gradients():
  hidden = jnp.ones((2, 3, 4))
  head = ob.Head(jnp.ones((4, 8)))
  labels = jnp.full((2, 3), -100)
  tok, grad = jax.jit(jax.value_and_grad(lambda h: ob.token_logprobs(h, head, labels, chunk_size=2).sum()))(hidden)
  assert float(tok) == 0.0 and not np.asarray(grad).any()


def test_sequence_helpers():
  ids = jnp.array([[5, 6, 7, 8, 0], [5, 9, 9, 0, 0]])
  mask = jnp.array([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]])
  labels = ob.next_token_labels(ids, mask)
  assert labels.tolist() == [[6, 7, 8, -100, -100], [-100, 9, -100, -100, -100]]
  tok = jnp.where(labels >= 0, -1.5, 0.0)
  assert ob.sequence_logps(tok, labels >= 0).tolist() == [-4.5, -1.5]
  assert ob.mean_logps(tok, labels >= 0).tolist() == [-1.5, -1.5]
  assert ob.mean_logps(tok, jnp.zeros_like(labels)).tolist() == [0.0, 0.0]


def test_bad_arguments_are_refused():
  h, head, labels = jnp.zeros((2, 3, 4)), ob.Head(jnp.ones((4, 8))), jnp.zeros((2, 3), int)
  with pytest.raises(ValueError, match="labels must have hidden's leading shape"):
    ob.token_logprobs(h, head, labels[:, :2])
  with pytest.raises(ValueError, match="labels must be integer token ids"):
    ob.token_logprobs(h, head, labels.astype(float))
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    ob.token_logprobs(h, head, labels, chunk_size=0)
  with pytest.raises(ValueError, match="temperature must be a positive number"):
    ob.token_logprobs(h, head, labels, temperature=0.0)
  with pytest.raises(ValueError, match="head must be a jlora.models.decoder.Head"):
    ob.token_logprobs(h, jnp.ones((4, 8)), labels)
  with pytest.raises(ValueError, match="token_logprobs_full: temperature must be a positive number"):
    ob.token_logprobs_full(h, head, labels, temperature=-1.0)
  with pytest.raises(ValueError, match="hidden must be"):
    ob.token_logprobs(jnp.zeros((4,)), head, jnp.zeros((), int))
  with pytest.raises(ValueError, match=r"input_ids must be \(batch, length\)"):
    ob.next_token_labels(jnp.zeros((3,), int))
  with pytest.raises(ValueError, match="mask must have input_ids' shape"):
    ob.next_token_labels(labels, jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="ignore_index must be negative"):
    ob.next_token_labels(labels, ignore_index=0)
  with pytest.raises(ValueError, match="mask must have token_logps' shape"):
    ob.sequence_logps(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="mean_logps: mask must have token_logps' shape"):
    ob.mean_logps(jnp.zeros((2, 3)), jnp.zeros((3,)))
