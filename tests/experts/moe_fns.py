"""Tiny mixture-of-experts functions for the expert-LoRA tests: a sorted-dispatch MoE that calls
``jax.lax.ragged_dot`` (as MaxText's and tunix's do) and its dense-dispatch einsum twin.

Parameters follow jlora.models' conventions (stacked over layers on axis 0):
``layers/mlp/experts/{gate_proj,up_proj,down_proj}/kernel`` ``[L, E, in, out]``,
``layers/mlp/router/kernel`` ``[L, H, E]``, optional shared expert
``layers/mlp/shared_expert/{gate,up,down}_proj/kernel`` ``[L, in, out]`` and
``layers/mlp/shared_expert_gate/kernel`` ``[L, H, 1]``, attention-like
``layers/self_attn/{q,o}_proj/kernel`` ``[L, H, H]``. ``decoder`` scans the layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jlora

EXPERTS = ("gate_proj", "up_proj", "down_proj")
EXPERT_LAYOUT = jlora.KernelLayout(batch_axes=(0, 1), in_axes=(2,))
STACKED_LAYOUT = jlora.KernelLayout(batch_axes=(0,), in_axes=(1,))


def init_params(seed=0, *, layers=2, hidden=16, inter=8, experts=4, shared=False, dtype=jnp.float32, scale=0.3):
  """Random parameters of ``decoder`` (NumPy draws: no compilation; a continuous router, so no top-k ties)."""
  rng = np.random.default_rng(seed)
  n = lambda shape: jnp.asarray(scale * rng.standard_normal(shape), dtype)
  mlp = {"router": {"kernel": n((layers, hidden, experts))},
         "experts": {"gate_proj": {"kernel": n((layers, experts, hidden, inter))},
                     "up_proj": {"kernel": n((layers, experts, hidden, inter))},
                     "down_proj": {"kernel": n((layers, experts, inter, hidden))}}}
  if shared:
    mlp["shared_expert"] = {"gate_proj": {"kernel": n((layers, hidden, inter))},
                            "up_proj": {"kernel": n((layers, hidden, inter))},
                            "down_proj": {"kernel": n((layers, inter, hidden))}}
    mlp["shared_expert_gate"] = {"kernel": n((layers, hidden, 1))}
  attn = {"q_proj": {"kernel": n((layers, hidden, hidden))}, "o_proj": {"kernel": n((layers, hidden, hidden))}}
  return {"layers": {"self_attn": attn, "mlp": mlp}}


def inputs(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def adapters(seed, params, config, *, scale=0.5):
  """``jlora.init`` with the expert layouts, then random non-zero A and B (NumPy draws)."""
  lay = layout(params)
  lazy = any(jlora._lazy.is_lazy_node(x) for x in jax.tree.leaves(params, is_leaf=jlora._lazy.is_lazy_node))
  init = (lambda p: jlora.init(jax.random.key(seed), p, config, layout=lay))
  lp = init(params) if lazy else jax.jit(init)(params)  # one compilation instead of op by op
  rng = np.random.default_rng(seed + 1000)

  def fill(w):
    if not isinstance(w, jlora.LoraWeight):
      return w
    draw = lambda f: jnp.asarray(scale * rng.standard_normal(f.shape), f.dtype)
    return w.replace(a=draw(w.a), b=draw(w.b))

  return jax.tree.map(fill, lp, is_leaf=lambda w: isinstance(w, jlora.LoraWeight))


def layout(params):
  """The kernels' layouts (experts ``[L, E, in, out]``, the rest ``[L, in, out]``)."""
  out = {}
  for path, leaf in jlora._tree.leaves_with_paths(params, is_leaf=jlora._weight.is_node):
    if path.endswith("/kernel"):
      out[path] = EXPERT_LAYOUT if "/experts/" in path else STACKED_LAYOUT
  return out


def route(x, router, top_k):
  """Softmax over the experts, top-k, renormalised (Mixtral's routing)."""
  probs = jax.nn.softmax((x @ router).astype(jnp.promote_types(x.dtype, jnp.float32)), axis=-1)
  w, idx = jax.lax.top_k(probs, top_k)
  return (w / w.sum(-1, keepdims=True)).astype(x.dtype), idx


def experts_sorted(x, mlp, top_k):
  """Sorted dispatch: repeat each token top_k times, sort by expert, three ragged_dots, unsort."""
  w, idx = route(x, mlp["router"]["kernel"], top_k)
  return dispatch_sorted(x, mlp["experts"], w, idx)


def dispatch_sorted(x, e, w, idx):
  """SwiGLU experts ``e`` on each token's ``top_k`` choices ``idx`` ([tokens, top_k]), weighted by ``w``:
  the token copies sorted by expert, one ``ragged_dot`` per projection, unsorted."""
  top_k, num = idx.shape[-1], e["gate_proj"]["kernel"].shape[0]
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  xs = x[order // top_k]
  sizes = jnp.bincount(flat, length=num).astype(jnp.int32)
  g = jax.lax.ragged_dot(xs, e["gate_proj"]["kernel"], sizes)
  u = jax.lax.ragged_dot(xs, e["up_proj"]["kernel"], sizes)
  ys = jax.lax.ragged_dot(jax.nn.silu(g) * u, e["down_proj"]["kernel"], sizes)
  y = ys[jnp.argsort(order)].reshape(x.shape[0], top_k, -1)
  return jnp.einsum("tkh,tk->th", y, w)


def experts_dense(x, mlp, top_k):
  """Dense dispatch: every token through every expert (einsums with E as a batch axis), weighted."""
  e = mlp["experts"]
  num = e["gate_proj"]["kernel"].shape[0]
  w, idx = route(x, mlp["router"]["kernel"], top_k)
  comb = jnp.sum(jax.nn.one_hot(idx, num, dtype=x.dtype) * w[..., None], axis=1)  # [T, E]
  g = jnp.einsum("th,ehi->eti", x, e["gate_proj"]["kernel"])
  u = jnp.einsum("th,ehi->eti", x, e["up_proj"]["kernel"])
  y = jnp.einsum("eti,eih->eth", jax.nn.silu(g) * u, e["down_proj"]["kernel"])
  return jnp.einsum("eth,te->th", y, comb)


def shared_expert(x, mlp):
  s = mlp["shared_expert"]
  h = jax.nn.silu(x @ s["gate_proj"]["kernel"]) * (x @ s["up_proj"]["kernel"])
  return jax.nn.sigmoid(x @ mlp["shared_expert_gate"]["kernel"]) * (h @ s["down_proj"]["kernel"])


def rms(x):
  f = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(f), -1, keepdims=True) + 1e-6).astype(x.dtype)


def decoder(params, x, *, top_k=2, dispatch="sorted"):
  """``x`` ``[B, S, H]`` through the scanned layers: a q/o mixer, then the MoE (+ shared expert)."""
  moe = experts_sorted if dispatch == "sorted" else experts_dense
  b, s, hdim = x.shape

  def layer(h, p):
    a = p["self_attn"]
    h = h + jnp.tanh(rms(h) @ a["q_proj"]["kernel"]) @ a["o_proj"]["kernel"]
    t = rms(h).reshape(b * s, hdim)
    y = moe(t, p["mlp"], top_k)
    if "shared_expert" in p["mlp"]:
      y = y + shared_expert(t, p["mlp"])
    return h + y.reshape(b, s, hdim), None

  h, _ = jax.lax.scan(layer, x, params["layers"])
  return h


def oracle_decoder(params64, x, *, top_k=2):
  """Float64 NumPy reference of ``decoder`` on dense (merged) kernels: a per-expert loop."""
  x = np.asarray(x, np.float64)
  b, s, hdim = x.shape
  L = params64["layers"]
  sig = lambda z: 1 / (1 + np.exp(-z))
  silu = lambda z: z * sig(z)
  rmsn = lambda z: z / np.sqrt(np.mean(z * z, -1, keepdims=True) + 1e-6)
  h = x
  for i in range(L["mlp"]["router"]["kernel"].shape[0]):
    k = lambda *names: np.asarray(_get(L, names)[i], np.float64)
    h = h + np.tanh(rmsn(h) @ k("self_attn", "q_proj", "kernel")) @ k("self_attn", "o_proj", "kernel")
    t = rmsn(h).reshape(b * s, hdim)
    logits = t @ k("mlp", "router", "kernel")
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    idx = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
    w = np.take_along_axis(p, idx, -1)
    w /= w.sum(-1, keepdims=True)
    y = np.zeros_like(t)
    for tok in range(t.shape[0]):
      for j in range(top_k):
        ex = idx[tok, j]
        gate = t[tok] @ k("mlp", "experts", "gate_proj", "kernel")[ex]
        up = t[tok] @ k("mlp", "experts", "up_proj", "kernel")[ex]
        y[tok] += w[tok, j] * ((silu(gate) * up) @ k("mlp", "experts", "down_proj", "kernel")[ex])
    if "shared_expert" in L["mlp"]:
      sg = k("mlp", "shared_expert", "gate_proj", "kernel")
      su = k("mlp", "shared_expert", "up_proj", "kernel")
      sd = k("mlp", "shared_expert", "down_proj", "kernel")
      y += sig(t @ k("mlp", "shared_expert_gate", "kernel")) * ((silu(t @ sg) * (t @ su)) @ sd)
    h = h + y.reshape(b, s, hdim)
  return h


def _get(tree, names):
  for n in names:
    tree = tree[n]
  return tree
