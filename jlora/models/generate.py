"""Batched text generation with a KV cache: one jitted prefill + decode loop.

Greedy (``temperature=0``) or sampling with temperature and nucleus (top-p)
filtering. Prompts of different lengths are left-padded (default) or
right-padded; positions and masks follow the real tokens either way. When
``params`` holds ``jlora.LoraWeight`` adapters every model call goes through
``jlora.wrap`` (the low-rank path; no merge), and any extra keyword arguments
are passed to every call. With a bank of adapters (``jlora.stack``),
``adapter_ids`` picks each row's adapter for the whole prompt and every
generated token: one batched generation serves many adapters.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._apply.wrap import wrap
from jlora._lazy import is_lazy_node
from jlora._weight import LoraWeight
from jlora.models.decoder import Decoder, Params


def _has_adapters(params: Any) -> bool:
  """Adapters or lazy kernels (a 4-bit ``jlora.NF4Weight`` base): both run through ``jlora.wrap``."""
  special = lambda x: isinstance(x, LoraWeight) or is_lazy_node(x)
  return any(special(x) for x in jax.tree.leaves(params, is_leaf=special))


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def sample_token(logits: jax.Array, key: jax.Array | None, *, temperature: float, top_p: float) -> jax.Array:
  """Next token per row from ``(B, vocab)`` float32 logits: argmax, or a tempered top-p sample.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.models.generate import sample_token
    >>> sample_token(jnp.array([[0.0, 3.0, 1.0]]), None, temperature=0.0, top_p=1.0).tolist()
    [1]
  """
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _row_ids(adapter_ids: Any, rows: int, lora: bool) -> jax.Array:
  """``adapter_ids`` as an int32 ``(rows,)`` array, or a ``ValueError`` saying what to pass."""
  if not lora:
    raise ValueError("generate: adapter_ids select adapters of a bank, but params hold no adapters; pass a bank "
                     "built with jlora.stack([...]) (or jlora.multi.load_bank).")
  ids = np.asarray(adapter_ids)
  if ids.shape != (rows,) or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"generate: adapter_ids must be one integer per prompt, shape ({rows},), got "
                     f"{ids.dtype} of shape {ids.shape}; every generated token of a row uses its prompt's adapter.")
  return jnp.asarray(ids, jnp.int32)


@functools.lru_cache(maxsize=64)
def _compiled(model: Decoder, lora: bool, max_new_tokens: int, temperature: float, top_p: float,
              left_padding: bool):
  call = wrap(model) if lora else model

  def run(params, ids, mask, key, eos, pad_id, kwargs):
    b, p = ids.shape
    dtype = params["embed_tokens"]["embedding"]
    dtype = (dtype.w0 if isinstance(dtype, LoraWeight) else dtype).dtype
    cache = model.init_cache(b, p + max_new_tokens, dtype)
    logits, cache = call(params, ids, attention_mask=mask, cache=cache, **kwargs)
    if left_padding:
      last = logits[:, -1]
    else:
      last = jnp.take_along_axis(logits, (jnp.sum(mask, axis=1) - 1)[:, None, None], axis=1)[:, 0]
    keys = jax.random.split(key, max_new_tokens)
    tok = sample_token(last.astype(jnp.float32), keys[0], temperature=temperature, top_p=top_p)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, eos)

    def cond(state):
      i, _, _, _, done = state
      return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
      i, out, tok, cache, done = state
      logits, cache = call(params, tok[:, None], attention_mask=jnp.ones((b, 1), jnp.int32), cache=cache, **kwargs)
      nxt = sample_token(logits[:, -1].astype(jnp.float32), keys[i], temperature=temperature, top_p=top_p)
      nxt = jnp.where(done, pad_id, nxt)
      return i + 1, out.at[:, i].set(nxt), nxt, cache, done | jnp.isin(nxt, eos)

    _, out, *_ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, tok, cache, done))
    return out

  return jax.jit(run)


def generate(model: Decoder, params: Params, prompts: Sequence[Sequence[int]] | np.ndarray, *,
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             eos_id: int | Sequence[int] | None = None, pad_id: int = 0, key: jax.Array | None = None,
             padding: str = "left", length_multiple: int = 8, adapter_ids: Sequence[int] | np.ndarray | None = None,
             **apply_kwargs: Any) -> list[list[int]]:
  """Continues each prompt until an end-of-sequence id or ``max_new_tokens``.

  Args:
    model: the ``Decoder``.
    params: plain parameters, or a jlora tree with adapters (served unmerged).
    prompts: token-id lists (any lengths), or a ``(B, T)`` array of full rows.
    max_new_tokens: tokens generated per prompt at most.
    temperature: 0 = greedy; otherwise sample from ``softmax(logits / temperature)``.
    top_p: nucleus sampling: keep the most likely tokens up to this probability mass.
    eos_id: id(s) that end a sequence (excluded from the result); default: the
      config's ``eos_token_id``; ``()`` never stops early.
    pad_id: id used for padding.
    key: PRNG key for sampling (required when ``temperature > 0``).
    padding: ``"left"`` (default) or ``"right"``.
    length_multiple: the padded prompt length is a multiple of this (fewer compilations).
    adapter_ids: with a bank of adapters as ``params`` (``jlora.stack``), the
      slot of each prompt's adapter, one per prompt (``-1``: the base alone);
      passed to every model call, prefill and decode alike. Greedy rows are
      exactly what each adapter generates alone; sampled rows draw from the
      batch's keys, so they depend on the batch they are in.
    **apply_kwargs: passed to every model call (e.g. ``lora_rng``).

  Returns:
    The generated ids of each prompt (the prompt itself and the end id excluded).

  Example:
    >>> import jax
    >>> from jlora.models import Decoder, ModelConfig, generate
    >>> cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
    ...   "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4})
    >>> model = Decoder(cfg)
    >>> out = generate(model, model.init(jax.random.key(0)), [[1, 2, 3], [4]], max_new_tokens=4, eos_id=())
    >>> [len(o) for o in out]
    [4, 4]

    Two adapters and the base in one batch:

    >>> import jlora
    >>> lps = [jlora.init(jax.random.key(i), model.init(jax.random.key(0)), jlora.LoraConfig(
    ...   rank=2, targets=model.targets("all-linear")), layout=model.layout) for i in (1, 2)]
    >>> out = generate(model, jlora.stack(lps), [[1, 2, 3], [4], [5, 6]], max_new_tokens=4, eos_id=(),
    ...                adapter_ids=[0, 1, -1])
    >>> [len(o) for o in out]
    [4, 4, 4]
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  if padding not in ("left", "right"):
    raise ValueError(f"padding must be 'left' or 'right', got {padding!r}.")
  if temperature > 0 and key is None:
    raise ValueError("sampling (temperature > 0) needs key=jax.random.key(...).")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
  rows = [list(map(int, p)) for p in np.asarray(prompts)] if isinstance(prompts, (np.ndarray, jax.Array)) else [
      list(map(int, p)) for p in prompts]
  if not rows or any(len(r) == 0 for r in rows):
    raise ValueError("generate: every prompt needs at least one token.")
  lora = _has_adapters(params)
  if adapter_ids is not None:
    apply_kwargs["adapter_ids"] = _row_ids(adapter_ids, len(rows), lora)
  if eos_id is None:
    eos = model.config.eos_token_ids
  else:
    eos = (int(eos_id),) if isinstance(eos_id, (int, np.integer)) else tuple(int(e) for e in eos_id)
  b = len(rows)
  p = _round_up(max(len(r) for r in rows), max(1, length_multiple))
  ids = np.full((b, p), pad_id, np.int32)
  mask = np.zeros((b, p), np.int32)
  for i, r in enumerate(rows):
    sl = slice(p - len(r), p) if padding == "left" else slice(0, len(r))
    ids[i, sl] = r
    mask[i, sl] = 1
  fn = _compiled(model, lora, int(max_new_tokens), float(temperature), float(top_p),
                 padding == "left")
  eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)
  out = np.asarray(fn(params, jnp.asarray(ids), jnp.asarray(mask), key if key is not None else jax.random.key(0),
                      eos_arr, jnp.int32(pad_id), apply_kwargs))
  results = []
  for row in out.tolist():
    cut = next((i for i, t in enumerate(row) if t in eos), len(row))
    results.append(row[:cut])
  return results
