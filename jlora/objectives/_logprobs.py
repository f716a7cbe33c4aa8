"""Token log-probabilities from hidden states and an output head, without ``(B, T, V)`` logits.

``token_logprobs`` walks the supervised positions (labels ``>= 0``) in blocks of about
``chunk_size`` positions: per block it computes the logits, the log-softmax at the label and,
when the hidden states are being differentiated, the gradient of that log-probability with
respect to the block's hidden states (a per-block VJP). Only that ``(B, T, D)`` gradient is
kept for the backward pass, which scales it by the incoming cotangent: the logits are neither
stored nor recomputed.

Cost, with ``N`` positions computed, hidden size ``D`` and vocabulary ``V``:

* frozen head (a plain array, not differentiated; LoRA's case): ``2·N·D·V`` FLOPs for the
  logits and ``2·N·D·V`` for the hidden-state gradient, all in the forward pass; the
  backward pass is one elementwise scale. Plain autodiff of materialised logits does the same
  ``4·N·D·V`` (forward, then ``dlogits @ Wᵀ``). Memory: one block of logits at a time
  (``chunk_size × V`` float32, about twice that while its gradient is formed) plus the
  ``(B, T, D)`` gradient, instead of ``(B, T, V)`` logits and their cotangent.
* head differentiated (a traced array with a tangent): the same forward; the backward pass
  recomputes each block's logits for the kernel gradient: ``8·N·D·V`` against autodiff's
  ``6·N·D·V``, still one block of logits at a time.
* adapted head (a ``jlora.LoraWeight``: an adapted ``lm_head`` or tied embedding): each block
  runs ``jlora.wrap``ped under ``jax.checkpoint`` with plain autodiff: ``6·N·D·V`` (the
  block's logits are recomputed in the backward pass) plus the low-rank terms.
* the reference pass (nothing differentiated, e.g. under ``jax.lax.stop_gradient``):
  ``2·N·D·V``.

Which positions are computed. The rows (sequences) stay a leading axis of every block, so
that a batch sharded over devices (data parallelism) is computed where it lies, each device
its own rows. Within each row the supervised positions are moved to the front (a stable sort
of the row's ``T`` flags); block ``k`` holds positions ``k·c … (k+1)·c − 1`` of every row's
sorted order, ``c = ceil(chunk_size / rows)``, and blocks past the longest row's supervised
count are skipped (``lax.cond``). So ``N = rows × c × ceil(max_count / c)``: every row is
computed up to the longest row's count (rounded up to ``c``), unsupervised positions beyond
that are not. Unsupervised positions get log-probability 0 and gradient 0.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jlora._apply.wrap import wrap
from jlora.models.decoder import Head

_F32 = jnp.float32


def _check(hidden, head, labels, *, temperature: float, chunk_size: int | None = None, fn: str):
  if not isinstance(head, Head):
    raise ValueError(f"{fn}: head must be a jlora.models.decoder.Head (Decoder.head(params), or "
                     f"Head(kernel, softcap=...) for another model), got {type(head).__name__}.")
  if jnp.ndim(hidden) < 2:
    raise ValueError(f"{fn}: hidden must be (..., hidden_size), got shape {jnp.shape(hidden)}.")
  if jnp.shape(labels) != jnp.shape(hidden)[:-1]:
    raise ValueError(f"{fn}: labels must have hidden's leading shape {jnp.shape(hidden)[:-1]}, got "
                     f"{jnp.shape(labels)}; labels[b, t] is the token that position t predicts "
                     "(next_token_labels(input_ids, mask) builds them).")
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(f"{fn}: labels must be integer token ids (negative: unsupervised), got "
                     f"{jnp.result_type(labels)}.")
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
    raise ValueError(f"{fn}: temperature must be a positive number (the sampling temperature the logits are "
                     f"divided by), got {temperature!r}.")
  if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"{fn}: chunk_size must be a positive int (positions per block of logits), got {chunk_size!r}.")


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer))


def _chunk_logprobs(weight, h, labels, *, transposed: bool, softcap: float | None, temperature: float):
  """``log_softmax(softcap(h @ kernel) / temperature)[labels]`` for ``h`` ``(..., D)``, in float32."""
  logits = Head(weight, transposed=transposed).project(h, preferred_element_type=_F32).astype(_F32)
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  if temperature != 1.0:
    logits = logits / temperature
  picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def token_logprobs_full(hidden: jax.Array, head: Head, labels: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """``log p(labels[..., t] | position t)`` from materialised ``(..., V)`` logits (the reference).

  The same arithmetic as ``token_logprobs`` applied to all positions at once: for tests, and
  for small vocabularies. An adapted head (``jlora.LoraWeight``) is applied through
  ``jlora.wrap``.

  Args:
    hidden: ``(..., D)`` hidden states (``Decoder.hidden_states``).
    head: the output ``Head`` (``Decoder.head(params)``).
    labels: ``hidden.shape[:-1]`` integer ids; negative: unsupervised (result 0).
    temperature: the logits are divided by it (after the soft-cap).

  Returns:
    float32 ``hidden.shape[:-1]``.

  Raises:
    ValueError: a bad ``head``, ``labels`` shape or dtype, or ``temperature``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.models.decoder import Head
    >>> from jlora.objectives import token_logprobs_full
    >>> lp = token_logprobs_full(jnp.zeros((1, 2, 4)), Head(jnp.ones((4, 8))), jnp.array([[3, -100]]))
    >>> [round(float(x), 4) for x in lp[0]]  # uniform over 8 tokens: log(1/8); unsupervised: 0
    [-2.0794, 0.0]
  """
  _check(hidden, head, labels, temperature=temperature, fn="token_logprobs_full")
  d = jnp.shape(hidden)[-1]
  lab = jnp.asarray(labels).reshape(-1)
  sup = lab >= 0
  fn = functools.partial(_chunk_logprobs, transposed=head.transposed, softcap=head.softcap,
                         temperature=float(temperature))
  if not _is_array(head.weight):
    fn = wrap(fn)
  lp = fn(head.weight, jnp.reshape(hidden, (-1, d)), jnp.where(sup, lab, 0))
  return jnp.where(sup, lp, 0.0).reshape(jnp.shape(labels))


def token_logprobs(hidden: jax.Array, head: Head, labels: jax.Array, *, chunk_size: int = 1024,
                   temperature: float = 1.0) -> jax.Array:
  """``log p(labels[..., t] | position t)`` in blocks of positions, never building ``(..., V)`` logits.

  ``logits = softcap(hidden @ kernel) / temperature`` (soft-cap first, as TRL's fused head and
  GRPO's sampling temperature), computed about ``chunk_size`` positions at a time, supervised
  positions first; the rows (sequences) stay a leading axis, so a batch sharded over devices is
  computed where it lies. See the module docstring for the custom VJP, which positions are
  computed and the cost. Which path runs is decided by the head:

  * ``head.weight`` a plain array: the custom VJP. If the weight is differentiated too, its
    gradient is computed in the backward pass by recomputing each block's logits.
  * ``head.weight`` a ``jlora.LoraWeight`` (adapted ``lm_head`` or tied embedding): each block
    under ``jax.checkpoint`` through ``jlora.wrap`` (the adapter unmerged, without dropout).

  Call it outside ``jlora.wrap`` (wrap ``Decoder.hidden_states`` only): inside a wrapped
  function an adapted head cannot reach the custom VJP.

  Args:
    hidden: ``(..., D)`` hidden states (``Decoder.hidden_states``), any float dtype.
    head: the output ``Head`` (``Decoder.head(params)``).
    labels: ``hidden.shape[:-1]`` integer ids, ``labels[..., t]`` the token position ``t``
      predicts (``next_token_labels``); negative: unsupervised, result 0. Ids must be below the
      vocabulary size. The last axis is the sequence, the others are rows.
    chunk_size: positions per block of logits, ``ceil(chunk_size / rows)`` of each row (at
      least one): the block is about ``chunk_size × V`` float32, twice that at its peak
      (1024 × 262,144 × 4 bytes is 1 GiB: use a smaller block for such vocabularies).
    temperature: the logits are divided by it (GRPO's sampling temperature).

  Returns:
    float32 ``hidden.shape[:-1]``.

  Raises:
    ValueError: a bad ``head``, ``labels`` shape or dtype, ``chunk_size`` or ``temperature``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jlora.models.decoder import Head
    >>> from jlora.objectives import token_logprobs, token_logprobs_full
    >>> h = jax.random.normal(jax.random.key(0), (2, 5, 8))
    >>> head = Head(jax.random.normal(jax.random.key(1), (8, 32)), softcap=3.0)
    >>> labels = jnp.array([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8]])
    >>> chunked = jax.jit(token_logprobs, static_argnames="chunk_size")(h, head, labels, chunk_size=3)
    >>> bool(jnp.allclose(chunked, token_logprobs_full(h, head, labels), atol=1e-6))
    True
  """
  _check(hidden, head, labels, temperature=temperature, chunk_size=chunk_size, fn="token_logprobs")
  shape = jnp.shape(labels)
  d = jnp.shape(hidden)[-1]
  t = shape[-1]
  rows = int(np.prod(shape[:-1]))
  if rows * t == 0:
    return jnp.zeros(shape, _F32)
  h = jnp.reshape(hidden, (rows, t, d))
  lab = jnp.asarray(labels).reshape(rows, t).astype(jnp.int32)
  c = min(t, math.ceil(chunk_size / rows))  # positions of each row per block
  sup = lab >= 0
  order = jnp.argsort(~sup, axis=1, stable=True).astype(jnp.int32)  # each row: supervised positions first
  count = jnp.sum(sup, axis=1, dtype=jnp.int32)
  cfg = (c, math.ceil(t / c), head.transposed, head.softcap, float(temperature))
  if _is_array(head.weight):
    out = _fused(cfg)(h, head.weight, lab, order, count)
  else:
    out = _adapted(cfg, h, head.weight, lab, order, count)
  return out.reshape(shape)


# -- the block loop ----------------------------------------------------------------------------
# Every array keeps the rows as its leading axis; ``order`` (rows, T) sorts each row's supervised
# positions first, ``count`` (rows,) counts them. Block k: sorted positions k·c ... (k+1)·c − 1.

def _padded(order, c: int, chunks: int):
  pad = c * chunks - order.shape[1]
  return jnp.pad(order, ((0, 0), (0, pad))) if pad else order


def _rows_take(x, idx):
  """``x[r, idx[r, j]]`` for ``x`` (rows, T, ...) and ``idx`` (rows, n)."""
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def _unsort(sorted_vals, order):
  """Back to each row's original positions: the inverse of ``_rows_take(x, order)``."""
  inv = jnp.argsort(order, axis=1)
  return _rows_take(sorted_vals, inv)


def _block_inputs(h, lab, order_p, count, k, c: int):
  start = k * c
  idx = lax.dynamic_slice_in_dim(order_p, start, c, axis=1)
  valid = start + jnp.arange(c, dtype=jnp.int32)[None, :] < count[:, None]
  return start, _rows_take(h, idx), jnp.where(valid, _rows_take(lab, idx), 0), valid


def _stacked(ys, t: int):
  """Blocks ``(chunks, rows, c, ...)`` -> sorted positions ``(rows, T, ...)``."""
  ys = jnp.moveaxis(ys, 0, 1)
  return ys.reshape((ys.shape[0], ys.shape[1] * ys.shape[2]) + ys.shape[3:])[:, :t]


def _loop(cfg, h, weight, lab, order, count, *, with_grad: bool):
  """Per block: log-probs (and their gradient w.r.t. the rows' hidden states), in sorted order."""
  c, chunks, transposed, softcap, temperature = cfg
  fn = functools.partial(_chunk_logprobs, transposed=transposed, softcap=softcap, temperature=temperature)
  order_p = _padded(order, c, chunks)
  rows, t, d = h.shape
  most = jnp.max(count)

  def body(_, k):
    start, h_k, lab_k, valid = _block_inputs(h, lab, order_p, count, k, c)

    def compute(_):
      if not with_grad:
        return jnp.where(valid, fn(weight, h_k, lab_k), 0.0), None
      lp, vjp = jax.vjp(lambda x: fn(weight, x, lab_k), h_k)
      (dh,) = vjp(valid.astype(_F32))  # padding positions: zero gradient
      return jnp.where(valid, lp, 0.0), dh

    def skip(_):
      return jnp.zeros((rows, c), _F32), (jnp.zeros((rows, c, d), h.dtype) if with_grad else None)

    return None, lax.cond(start < most, compute, skip, None)

  _, (lp, dh) = lax.scan(body, None, jnp.arange(chunks, dtype=jnp.int32))
  return _stacked(lp, t), (_stacked(dh, t) if with_grad else None)


def _weight_grad(cfg, h, weight, lab, order, count, g_sorted):
  """``d(Σ g·logp)/d weight``, recomputing each block's logits."""
  c, chunks, transposed, softcap, temperature = cfg
  fn = functools.partial(_chunk_logprobs, transposed=transposed, softcap=softcap, temperature=temperature)
  order_p = _padded(order, c, chunks)
  g_p = _padded(g_sorted, c, chunks)
  most = jnp.max(count)

  def body(acc, k):
    start, h_k, lab_k, valid = _block_inputs(h, lab, order_p, count, k, c)

    def compute(acc):
      _, vjp = jax.vjp(lambda w: fn(w, h_k, lab_k), weight)
      g_k = jnp.where(valid, lax.dynamic_slice_in_dim(g_p, start, c, axis=1), 0.0)
      return acc + vjp(g_k)[0].astype(_F32)

    return lax.cond(start < most, compute, lambda acc: acc, acc), None

  acc, _ = lax.scan(body, jnp.zeros(weight.shape, _F32), jnp.arange(chunks, dtype=jnp.int32))
  return acc.astype(weight.dtype)


@functools.lru_cache(maxsize=None)
def _fused(cfg):
  """The custom-VJP token log-probs for one static configuration (blocking, head, temperature)."""

  @jax.custom_vjp
  def f(h, weight, lab, order, count):
    lp, _ = _loop(cfg, h, weight, lab, order, count, with_grad=False)
    return _unsort(lp, order)

  def fwd(h, weight, lab, order, count):
    need_h, need_w = h.perturbed, weight.perturbed
    h, weight, lab, order, count = h.value, weight.value, lab.value, order.value, count.value
    lp, dh = _loop(cfg, h, weight, lab, order, count, with_grad=need_h)
    recompute = (h, weight, lab, count) if need_w else None
    return _unsort(lp, order), (dh, order, recompute)

  def bwd(res, g):
    dh_sorted, order, recompute = res
    if isinstance(g, SymbolicZero):
      return None, None, None, None, None
    g_sorted = _rows_take(g.astype(_F32), order)
    dh = None
    if dh_sorted is not None:
      dh = _unsort((dh_sorted.astype(_F32) * g_sorted[..., None]).astype(dh_sorted.dtype), order)
    dw = None
    if recompute is not None:
      h, weight, lab, count = recompute
      dw = _weight_grad(cfg, h, weight, lab, order, count, g_sorted)
    return dh, dw, None, None, None

  f.defvjp(fwd, bwd, symbolic_zeros=True)
  return f


def _adapted(cfg, h, weight, lab, order, count):
  """An adapted head: each block through ``jlora.wrap`` under ``jax.checkpoint``, plain autodiff."""
  c, chunks, transposed, softcap, temperature = cfg
  fn = jax.checkpoint(wrap(functools.partial(_chunk_logprobs, transposed=transposed, softcap=softcap,
                                                   temperature=temperature)))
  order_p = _padded(order, c, chunks)
  rows, t, _ = h.shape
  most = jnp.max(count)

  def body(_, k):
    start, h_k, lab_k, valid = _block_inputs(h, lab, order_p, count, k, c)
    lp = lax.cond(start < most, lambda _: jnp.where(valid, fn(weight, h_k, lab_k), 0.0),
                  lambda _: jnp.zeros((rows, c), _F32), None)
    return None, lp

  _, lp = lax.scan(body, None, jnp.arange(chunks, dtype=jnp.int32))
  return _unsort(_stacked(lp, t), order)


# -- labels and sequence sums -------------------------------------------------------------------

def next_token_labels(input_ids: jax.Array, mask: jax.Array | None = None, *, ignore_index: int = -100) -> jax.Array:
  """Labels aligned with the positions that predict them: ``labels[:, t] = input_ids[:, t + 1]``.

  Position ``t`` is supervised when ``mask[:, t + 1]`` is set (the token it predicts is, e.g.,
  a completion token); the last position predicts nothing.

  Args:
    input_ids: ``(B, T)`` token ids.
    mask: ``(B, T)`` which tokens are scored (a completion or loss mask; the attention mask
      for every real token); default: all.
    ignore_index: the label of unsupervised positions (negative).

  Returns:
    int32 ``(B, T)``.

  Raises:
    ValueError: mismatched shapes or a non-negative ``ignore_index``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.objectives import next_token_labels
    >>> next_token_labels(jnp.array([[5, 6, 7, 8]]), jnp.array([[0, 0, 1, 1]])).tolist()
    [[-100, 7, 8, -100]]
  """
  ids = jnp.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"next_token_labels: input_ids must be (batch, length), got shape {ids.shape}.")
  if mask is not None and jnp.shape(mask) != ids.shape:
    raise ValueError(f"next_token_labels: mask must have input_ids' shape {ids.shape}, got {jnp.shape(mask)}.")
  if ignore_index >= 0:
    raise ValueError(f"next_token_labels: ignore_index must be negative (it marks unsupervised positions), got "
                     f"{ignore_index}.")
  nxt = ids[:, 1:].astype(jnp.int32)
  if mask is not None:
    nxt = jnp.where(jnp.asarray(mask)[:, 1:].astype(bool), nxt, ignore_index)
  return jnp.concatenate([nxt, jnp.full((ids.shape[0], 1), ignore_index, jnp.int32)], axis=1)


def _masked(token_logps, mask, fn: str):
  if jnp.shape(mask) != jnp.shape(token_logps):
    raise ValueError(f"{fn}: mask must have token_logps' shape {jnp.shape(token_logps)}, got {jnp.shape(mask)} "
                     "(the mask of the positions, e.g. labels >= 0, not of the tokens).")
  m = jnp.asarray(mask).astype(bool)
  return jnp.sum(jnp.where(m, token_logps, 0.0), axis=-1), jnp.sum(m, axis=-1)


def sequence_logps(token_logps: jax.Array, mask: jax.Array) -> jax.Array:
  """Summed log-probability of each sequence over the positions ``mask`` selects: ``(..., T) -> (...)``.

  Args:
    token_logps: ``token_logprobs`` output.
    mask: positions to sum, aligned with ``token_logps`` (``labels >= 0``, or a subset of them).

  Returns:
    float32 ``token_logps.shape[:-1]``.

  Raises:
    ValueError: mismatched shapes.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.objectives import sequence_logps
    >>> sequence_logps(jnp.array([[-1.0, -2.0, -4.0]]), jnp.array([[1, 0, 1]])).tolist()
    [-5.0]
  """
  return _masked(token_logps, mask, "sequence_logps")[0]


def mean_logps(token_logps: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean log-probability per selected position (length-normalised; empty rows give 0).

  Args:
    token_logps: ``token_logprobs`` output.
    mask: positions to average, aligned with ``token_logps``.

  Returns:
    float32 ``token_logps.shape[:-1]``.

  Raises:
    ValueError: mismatched shapes.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.objectives import mean_logps
    >>> mean_logps(jnp.array([[-1.0, -2.0, -4.0]]), jnp.array([[1, 0, 1]])).tolist()
    [-2.5]
  """
  total, n = _masked(token_logps, mask, "mean_logps")
  return total / jnp.maximum(n, 1).astype(total.dtype)
