"""Rollouts for reinforcement learning: G sampled completions per prompt from the unmerged adapters.

``rollout`` repeats each prompt ``G`` times, left-pads the prompts to one width, samples the
completions with the jitted KV-cache generator (``jlora.models.generate.generate_tokens``:
the adapters served as they are, nothing merged or copied), cuts each completion after its
end (an end-of-sequence id, a stop sequence, or a stop string found in its text) and returns
the rows as the training step reads them: prompt and completion side by side, the
completion's tokens marked. Given a mesh, the rows are split over its data axes as training
splits a batch, and each process generates (and gets back) its own rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlora.models.generate import generate_tokens
from jlora.sharding import DATA_AXES

Params = Any


class Rollout(NamedTuple):
  """``rollout``'s rows (this process's), NumPy; row ``i`` is a completion of prompt ``i // G``."""

  input_ids: np.ndarray  # (N, P + C) int32: the prompt left-padded to P, then the completion right-padded to C
  attention_mask: np.ndarray  # (N, P + C) int32: 1 on the prompt's and the completion's tokens
  completion_mask: np.ndarray  # (N, P + C) int32: 1 on the completion's tokens, its end (EOS or stop) included
  completion_ids: list[list[int]]  # each completion's tokens, its end included
  completions: list[str] | None  # each completion decoded (special tokens skipped), with a tokenizer
  truncated: np.ndarray  # (N,) bool: cut at max_new_tokens (no end-of-sequence id or stop found)

  prompt_length: int  # P: the columns before the completions

  @property
  def completion_lengths(self) -> np.ndarray:
    """``(N,)`` tokens of each completion."""
    return self.completion_mask.sum(axis=1)


def pad_prompts(prompts: Sequence[Sequence[int]], *, num_generations: int, width: int | None = None,
                pad_id: int = 0, length_multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Each prompt ``num_generations`` times in a row, left-padded: ``(ids, mask)``, ``(B·G, width)`` int32.

  ``width`` defaults to the longest prompt rounded up to ``length_multiple``.

  Raises:
    ValueError: an empty prompt, or one longer than ``width``.

  Example:
    >>> from jlora.objectives import pad_prompts
    >>> ids, mask = pad_prompts([[5, 6], [7]], num_generations=2, width=3)
    >>> ids.tolist()
    [[0, 5, 6], [0, 5, 6], [0, 0, 7], [0, 0, 7]]
  """
  rows = [[int(t) for t in p] for p in prompts]
  if not rows or any(not r for r in rows):
    raise ValueError("rollout: every prompt needs at least one token.")
  longest = max(len(r) for r in rows)
  width = -(-longest // length_multiple) * length_multiple if width is None else width
  if longest > width:
    raise ValueError(f"rollout: a prompt of {longest} tokens does not fit prompt_length={width}; truncate the prompts "
                     "or give a larger prompt_length.")
  ids = np.full((len(rows) * num_generations, width), pad_id, np.int32)
  mask = np.zeros_like(ids)
  for i, r in enumerate(rows):
    sl = slice(i * num_generations, (i + 1) * num_generations)
    ids[sl, width - len(r):] = r
    mask[sl, width - len(r):] = 1
  return ids, mask


def place_rows(x: np.ndarray, mesh: Mesh | None) -> jax.Array | np.ndarray:
  """This process's rows as one global array split over the mesh's data axes (identity without a mesh)."""
  if mesh is None:
    return x
  spec = PartitionSpec(DATA_AXES, *([None] * (x.ndim - 1)))
  return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), np.asarray(x))


def local_rows(x: jax.Array | np.ndarray) -> np.ndarray:
  """The rows of a global array (split on its first axis) that this process holds, in order."""
  if isinstance(x, np.ndarray) or getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  pieces = {}
  for shard in x.addressable_shards:
    start = shard.index[0].start or 0
    pieces.setdefault(start, np.asarray(shard.data))
  return np.concatenate([pieces[k] for k in sorted(pieces)], axis=0)


def _stop_sequences(stop: Sequence[str | Sequence[int]], tokenizer: Any) -> tuple[list[list[int]], list[str]]:
  ids, texts = [], []
  for s in stop:
    if isinstance(s, str):
      if tokenizer is None:
        raise ValueError(f"rollout: the stop string {s!r} needs tokenizer= (to find it in the decoded completions); "
                         "or give stop sequences as token ids.")
      if not s:
        raise ValueError("rollout: a stop string must not be empty.")
      texts.append(s)
      encoded = list(tokenizer(s, add_special_tokens=False)["input_ids"])
      if encoded:
        ids.append(encoded)
    else:
      ids.append([int(t) for t in s])
  return ids, texts


def _cut_at_text(tokens: list[int], texts: list[str], tokenizer: Any) -> int | None:
  """The fewest leading tokens whose text holds a stop string, or None."""
  decode = lambda n: tokenizer.decode(tokens[:n], skip_special_tokens=True)  # noqa: E731
  if not any(t in decode(len(tokens)) for t in texts):
    return None
  lo, hi = 1, len(tokens)  # decode(prefix) holds a stop string from some length on
  while lo < hi:
    mid = (lo + hi) // 2
    if any(t in decode(mid) for t in texts):
      hi = mid
    else:
      lo = mid + 1
  return lo


def rollout(model: Any, params: Params, prompts: Sequence[Sequence[int]], *, num_generations: int,
            max_new_tokens: int, key: jax.Array, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
            stop: Sequence[str | Sequence[int]] = (), tokenizer: Any = None, eos_id: int | Sequence[int] | None = None,
            pad_id: int = 0, prompt_length: int | None = None, mesh: Mesh | None = None,
            **apply_kwargs: Any) -> Rollout:
  """``num_generations`` sampled completions of each prompt, from the adapters as they are (unmerged).

  The rows are prompt 0's ``G`` completions, then prompt 1's, and so on (TRL's order). A
  completion ends after its first end-of-sequence id (kept, and trained, as TRL keeps it), a
  stop sequence, or the token that completes a stop string in its decoded text (kept, as
  Hugging Face's ``stop_strings`` keep it). The stop strings' own tokenizations end the
  sampling loop early; the decoded text decides where the completion ends, whatever tokens
  spelled it. For the policy's, the old policy's and the reference's log-probs of the rows:
  ``model_token_logprobs(model, params, r.input_ids, r.completion_mask,
  attention_mask=r.attention_mask, temperature=temperature)`` (``reference=True``: adapters off).

  Args:
    model: a ``jlora.models.Decoder``.
    params: the LoRA tree (or plain parameters).
    prompts: this process's prompts, as token-id lists.
    num_generations: completions per prompt ``G``.
    max_new_tokens: ``C``, the longest completion (TRL's ``max_completion_length``).
    key: the sampling key (a greedy rollout, ``temperature=0``, ignores it).
    temperature: sampling temperature (0: greedy, as ``jlora.models.generate``).
    top_p: nucleus sampling's probability mass (1: off).
    top_k: keep the ``top_k`` most likely tokens (0: all).
    stop: stop strings (need ``tokenizer``) or stop sequences of token ids.
    tokenizer: a Hugging Face tokenizer: completions decoded (``Rollout.completions``), stop strings.
    eos_id: end-of-sequence id(s) (default: the model config's).
    pad_id: the padding id (prompts on the left, completions on the right).
    prompt_length: ``P``, the prompts' padded width (default: the longest, rounded up to 8).
    mesh: split the rows over this mesh's data axes (each process passes its own prompts).
    **apply_kwargs: passed to every model call (e.g. ``adapter_ids``).

  Returns:
    A ``Rollout`` of ``len(prompts) × G`` rows, ``P + C`` columns.

  Raises:
    ValueError: bad prompts, sampling options or stop entries.

  Example:
    >>> import jax, jlora
    >>> from jlora.models import Decoder, ModelConfig
    >>> from jlora.objectives import rollout
    >>> model = Decoder(ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
    ...   "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}))
    >>> lp = jlora.init(jax.random.key(0), model.init(jax.random.key(1)),
    ...                 jlora.LoraConfig(rank=2, targets=model.targets("all-linear")), layout=model.layout)
    >>> r = rollout(model, lp, [[1, 2, 3], [4, 5]], num_generations=2, max_new_tokens=4, key=jax.random.key(2),
    ...             eos_id=())
    >>> r.input_ids.shape, r.completion_lengths.tolist()
    ((4, 12), [4, 4, 4, 4])
  """
  if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
    raise ValueError(f"rollout: num_generations must be a positive integer, got {num_generations!r}.")
  stop_ids, stop_texts = _stop_sequences(stop, tokenizer)
  ids, mask = pad_prompts(prompts, num_generations=num_generations, width=prompt_length, pad_id=pad_id)
  gen = generate_tokens(model, params, place_rows(ids, mesh), place_rows(mask, mesh), max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, top_k=top_k, eos_id=eos_id, stop_ids=stop_ids,
                        pad_id=pad_id, key=key, **apply_kwargs)
  tokens, lengths, ended = (local_rows(x) for x in (gen.tokens, gen.lengths, gen.ended))
  n, c = tokens.shape
  completion_ids, truncated = [], np.zeros((n,), bool)
  for i in range(n):
    row = tokens[i, :lengths[i]].tolist()
    cut = _cut_at_text(row, stop_texts, tokenizer) if stop_texts else None
    if cut is not None:
      row = row[:cut]
    completion_ids.append(row)
    truncated[i] = not ended[i] and cut is None
  comp = np.full((n, c), pad_id, np.int32)
  comp_mask = np.zeros((n, c), np.int32)
  for i, row in enumerate(completion_ids):
    comp[i, :len(row)] = row
    comp_mask[i, :len(row)] = 1
  completions = None
  if tokenizer is not None:
    completions = [tokenizer.decode(row, skip_special_tokens=True) for row in completion_ids]
  return Rollout(input_ids=np.concatenate([ids, comp], axis=1), attention_mask=np.concatenate([mask, comp_mask], 1),
                 completion_mask=np.concatenate([np.zeros_like(mask), comp_mask], axis=1),
                 completion_ids=completion_ids, completions=completions, truncated=truncated,
                 prompt_length=ids.shape[1])
