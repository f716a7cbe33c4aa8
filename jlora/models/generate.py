"""Batched text generation with a KV cache: one jitted prefill + decode loop.

Greedy (``temperature=0``) or sampling with temperature, top-k and nucleus (top-p)
filtering. A row ends at an end-of-sequence id or a stop sequence of token ids.
Prompts of different lengths are left-padded (default) or right-padded; positions
and masks follow the real tokens either way. ``generate`` takes and returns token
lists; ``generate_tokens`` takes and returns arrays (a batch already padded, and
sharded as the caller placed it: rollouts of reinforcement learning). When
``params`` holds ``jlora.LoraWeight`` adapters every model call goes through
``jlora.wrap`` (the low-rank path; no merge), and any extra keyword arguments
are passed to every call. With a bank of adapters (``jlora.stack``),
``adapter_ids`` picks each row's adapter for the whole prompt and every
generated token: one batched generation serves many adapters.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

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


def sample_token(logits: jax.Array, key: jax.Array | None, *, temperature: float, top_p: float,
                 top_k: int = 0) -> jax.Array:
  """Next token per row from ``(B, vocab)`` float32 logits: argmax, or a tempered top-k/top-p sample.

  As Hugging Face's warpers, in their order: the logits are divided by ``temperature``, then
  only the ``top_k`` largest are kept (ties with the k-th included; 0 = all), then the
  smallest set of most likely tokens whose mass reaches ``top_p``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.models.generate import sample_token
    >>> sample_token(jnp.array([[0.0, 3.0, 1.0]]), None, temperature=0.0, top_p=1.0).tolist()
    [1]
  """
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if 0 < top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
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


class Generated(NamedTuple):
  """What ``generate_tokens`` returns: arrays, one row per prompt row."""

  tokens: jax.Array  # (B, max_new_tokens) int32: the generated ids, ``pad_id`` after the row ended
  lengths: jax.Array  # (B,) int32: tokens generated, its end-of-sequence id or stop sequence included
  ended: jax.Array  # (B,) bool: the row ended on an end-of-sequence id or a stop sequence (else: max_new_tokens)


@functools.lru_cache(maxsize=64)
def _compiled(model: Decoder, lora: bool, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
              left_padding: bool):
  call = wrap(model) if lora else model
  sample = functools.partial(sample_token, temperature=temperature, top_p=top_p, top_k=top_k)

  def run(params, ids, mask, key, eos, pad_id, stops, kwargs):
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
    # stops: (S, L) token ids right-aligned, -1 before a shorter sequence (rows ending in -3 match nothing);
    # tail: each row's last L tokens (-2 before the first).
    tail = jnp.full((b, stops.shape[1]), -2, jnp.int32)

    def ends(tok, tail):
      tail = jnp.concatenate([tail[:, 1:], tok[:, None]], axis=1)
      hit = jnp.all((stops[None] == -1) | (tail[:, None, :] == stops[None]), axis=-1)  # (B, S)
      return jnp.isin(tok, eos) | jnp.any(hit, axis=-1), tail

    tok = sample(last.astype(jnp.float32), keys[0])
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done, tail = ends(tok, tail)
    length = jnp.ones((b,), jnp.int32)

    def cond(state):
      i, *_, done = state
      return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
      i, out, tok, cache, tail, length, done = state
      logits, cache = call(params, tok[:, None], attention_mask=jnp.ones((b, 1), jnp.int32), cache=cache, **kwargs)
      nxt = sample(logits[:, -1].astype(jnp.float32), keys[i])
      nxt = jnp.where(done, pad_id, nxt)
      ended, tail = ends(nxt, tail)
      return (i + 1, out.at[:, i].set(nxt), nxt, cache, tail, jnp.where(done, length, i + 1), done | ended)

    _, out, _, _, _, length, done = jax.lax.while_loop(cond, body, (jnp.int32(1), out, tok, cache, tail, length,
                                                                    done))
    return Generated(out, length, done)

  return jax.jit(run)


def _eos_ids(model: Decoder, eos_id: int | Sequence[int] | None) -> tuple[int, ...]:
  if eos_id is None:
    return tuple(model.config.eos_token_ids)
  return (int(eos_id),) if isinstance(eos_id, (int, np.integer)) else tuple(int(e) for e in eos_id)


def _stop_array(stop_ids: Sequence[Sequence[int]]) -> np.ndarray:
  """Stop sequences as an ``(S, L)`` int32 array, right-aligned, ``-1`` before the shorter ones.

  ``S`` is padded to a power of two and ``L`` to a multiple of 4 (fewer compilations) with rows
  that match nothing (their last entry, ``-3``, is no token).
  """
  seqs = [[int(t) for t in s] for s in stop_ids]
  if any(not s or min(s) < 0 for s in seqs):
    raise ValueError(f"generate: each stop sequence must be a non-empty list of token ids (>= 0), got {stop_ids!r}.")
  width = _round_up(max((len(s) for s in seqs), default=1), 4)
  rows = 1 << max(len(seqs) - 1, 0).bit_length()
  out = np.full((rows, width), -1, np.int32)
  out[:, -1] = -3
  for i, s in enumerate(seqs):
    out[i, width - len(s):] = s
  return out


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int, key) -> None:
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  if temperature > 0 and key is None:
    raise ValueError("sampling (temperature > 0) needs key=jax.random.key(...).")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise ValueError(f"top_k must be an integer >= 0 (0 keeps every token), got {top_k!r}.")


def generate_tokens(model: Decoder, params: Params, ids: jax.Array | np.ndarray, mask: jax.Array | np.ndarray, *,
                    max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                    eos_id: int | Sequence[int] | None = None, stop_ids: Sequence[Sequence[int]] = (),
                    pad_id: int = 0, key: jax.Array | None = None, padding: str = "left",
                    **apply_kwargs: Any) -> Generated:
  """Continues a padded batch of prompts: arrays in, arrays out, one jitted program.

  The array form of ``generate``: no padding or cutting on the host, and the arrays keep
  the shardings the caller gave them (a batch split over a mesh's data axis is generated
  where it lies; each process of a multi-host run holds and reads its own rows).

  Args:
    model: the ``Decoder``.
    params: plain parameters, or a jlora tree with adapters (served unmerged).
    ids: ``(B, P)`` prompt token ids, padded on the side ``padding`` says.
    mask: ``(B, P)`` 1 on the prompts' real tokens.
    max_new_tokens: tokens generated per row at most.
    temperature: 0 = greedy; otherwise sample from ``softmax(logits / temperature)``.
    top_p: nucleus sampling: keep the most likely tokens up to this probability mass.
    top_k: keep only the ``top_k`` most likely tokens (0: all), before ``top_p``.
    eos_id: id(s) that end a row; default: the config's ``eos_token_id``; ``()``: none.
    stop_ids: token-id sequences that end a row when its generated tokens end with one.
    pad_id: written after a row ended.
    key: PRNG key for sampling (required when ``temperature > 0``).
    padding: ``"left"`` (default) or ``"right"``.
    **apply_kwargs: passed to every model call (e.g. ``lora_rng``, ``adapter_ids``).

  Returns:
    A ``Generated``: the ``(B, max_new_tokens)`` tokens, each row's length (its end id or
    stop sequence included) and whether it ended before ``max_new_tokens``.

  Example:
    >>> import jax, numpy as np
    >>> from jlora.models import Decoder, ModelConfig
    >>> from jlora.models.generate import generate_tokens
    >>> cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
    ...   "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4})
    >>> model = Decoder(cfg)
    >>> g = generate_tokens(model, model.init(jax.random.key(0)), np.array([[0, 1, 2], [3, 4, 5]]),
    ...                     np.array([[0, 1, 1], [1, 1, 1]]), max_new_tokens=4, eos_id=(), temperature=1.0,
    ...                     top_k=8, key=jax.random.key(1))
    >>> g.tokens.shape, g.lengths.tolist()
    ((2, 4), [4, 4])
  """
  _check_sampling(max_new_tokens, temperature, top_p, top_k, key)
  if padding not in ("left", "right"):
    raise ValueError(f"padding must be 'left' or 'right', got {padding!r}.")
  if np.shape(ids) != np.shape(mask) or len(np.shape(ids)) != 2:
    raise ValueError(f"generate_tokens: ids and mask must both be (rows, length), got {np.shape(ids)} and "
                     f"{np.shape(mask)}.")
  lora = _has_adapters(params)
  if "adapter_ids" in apply_kwargs:
    apply_kwargs["adapter_ids"] = _row_ids(apply_kwargs["adapter_ids"], np.shape(ids)[0], lora)
  eos = _eos_ids(model, eos_id)
  fn = _compiled(model, lora, int(max_new_tokens), float(temperature), float(top_p), int(top_k), padding == "left")
  return fn(params, ids, mask, key if key is not None else jax.random.key(0), jnp.asarray(eos or (-1,), jnp.int32),
            jnp.int32(pad_id), jnp.asarray(_stop_array(stop_ids)), apply_kwargs)


def generate(model: Decoder, params: Params, prompts: Sequence[Sequence[int]] | np.ndarray, *,
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             eos_id: int | Sequence[int] | None = None, pad_id: int = 0, key: jax.Array | None = None,
             padding: str = "left", length_multiple: int = 8, adapter_ids: Sequence[int] | np.ndarray | None = None,
             top_k: int = 0, stop_ids: Sequence[Sequence[int]] = (), **apply_kwargs: Any) -> list[list[int]]:
  """Continues each prompt until an end-of-sequence id, a stop sequence or ``max_new_tokens``.

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
    top_k: keep only the ``top_k`` most likely tokens when sampling (0: all), before ``top_p``.
    stop_ids: token-id sequences that end a row when its generated tokens end with one
      (kept in the result, as Hugging Face keeps a stop string).
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
  _check_sampling(max_new_tokens, temperature, top_p, top_k, key)
  if padding not in ("left", "right"):
    raise ValueError(f"padding must be 'left' or 'right', got {padding!r}.")
  rows = [list(map(int, p)) for p in np.asarray(prompts)] if isinstance(prompts, (np.ndarray, jax.Array)) else [
      list(map(int, p)) for p in prompts]
  if not rows or any(len(r) == 0 for r in rows):
    raise ValueError("generate: every prompt needs at least one token.")
  if adapter_ids is not None:
    apply_kwargs["adapter_ids"] = adapter_ids
  eos = _eos_ids(model, eos_id)
  b = len(rows)
  p = _round_up(max(len(r) for r in rows), max(1, length_multiple))
  ids = np.full((b, p), pad_id, np.int32)
  mask = np.zeros((b, p), np.int32)
  for i, r in enumerate(rows):
    sl = slice(p - len(r), p) if padding == "left" else slice(0, len(r))
    ids[i, sl] = r
    mask[i, sl] = 1
  out = generate_tokens(model, params, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, top_k=top_k, eos_id=eos, stop_ids=stop_ids, pad_id=pad_id, key=key,
                        padding=padding, **apply_kwargs)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  results = []
  for row, n in zip(tokens.tolist(), lengths.tolist()):
    row = row[:n]
    results.append(row[:-1] if row and row[-1] in eos else row)
  return results
