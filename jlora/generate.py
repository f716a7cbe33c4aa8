"""Text generation with a base model, a base + adapter (unmerged) or a merged model.

  python -m jlora.generate --adapter runs/default/adapter --prompt "Reverse the words: a b c"
  python -m jlora.generate --adapter A1 --adapter A2 --prompt "..."   # one base, adapters swapped

The base is loaded once; every adapter is attached to the same base arrays
(``jlora.load_adapter``), so switching adapters costs no reload. For each
prompt the command prints the base model's output, then for each adapter the
unmerged (low-rank path) and merged (``jlora.merge``) outputs.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jlora


def _round_up(n: int, m: int) -> int:
  return ((n + m - 1) // m) * m


@functools.lru_cache(maxsize=None)
def _generate_fn(model, lora: bool, max_new_tokens: int, temperature: float):
  """A jitted prefill + decode loop for one Hugging Face Flax causal LM."""

  def call(params, ids, mask, pos, cache):
    out = model(ids, attention_mask=mask, position_ids=pos, params=params, past_key_values=cache)
    return out.logits, out.past_key_values

  step_fn = jlora.wrap(call) if lora else call

  def pick(logits, key):
    if temperature <= 0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

  @jax.jit
  def generate(params, ids, prompt_mask, cache, key, eos_id):
    b, p = ids.shape
    ext_mask = jnp.ones((b, p + max_new_tokens), jnp.int32)
    ext_mask = jax.lax.dynamic_update_slice(ext_mask, prompt_mask.astype(jnp.int32), (0, 0))
    pos = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
    logits, cache = step_fn(params, ids, ext_mask, pos, cache)
    keys = jax.random.split(key, max_new_tokens)
    tok = pick(logits[:, -1].astype(jnp.float32), keys[0])
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(tok)
    done = tok == eos_id
    last = pos[:, -1]

    def body(i, carry):
      out, tok, cache, last, done = carry
      last = last + 1
      logits, cache = step_fn(params, tok[:, None], ext_mask, last[:, None], cache)
      nxt = pick(logits[:, -1].astype(jnp.float32), keys[i])
      nxt = jnp.where(done, eos_id, nxt)
      return out.at[:, i].set(nxt), nxt, cache, last, done | (nxt == eos_id)

    out, *_ = jax.lax.fori_loop(1, max_new_tokens, body, (out, tok, cache, last, done))
    return out

  return generate


def generate_ids(model, params, prompts: Sequence[Sequence[int]], *, eos_id: int, pad_id: int,
                 max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
                 batch_size: int = 64) -> list[list[int]]:
  """Continues each prompt (token ids) until EOS or ``max_new_tokens``.

  ``params`` may be plain (base or merged) or hold ``LoraWeight``s (unmerged:
  the wrapped low-rank path runs). Prompts are left-padded into batches.
  """
  lora = any(isinstance(x, jlora.LoraWeight)
             for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, jlora.LoraWeight)))
  fn = _generate_fn(model, lora, int(max_new_tokens), float(temperature))
  results: list[list[int]] = []
  key = jax.random.key(seed)
  for start in range(0, len(prompts), batch_size):
    chunk = [list(p) for p in prompts[start:start + batch_size]]
    n = len(chunk)
    b = _round_up(n, 8)
    p = _round_up(max(len(c) for c in chunk), 8)
    ids = np.full((b, p), pad_id, np.int32)
    mask = np.zeros((b, p), np.int32)
    for i, c in enumerate(chunk):
      ids[i, p - len(c):] = c
      mask[i, p - len(c):] = 1
    mask[n:, -1] = 1  # filler rows: one visible token
    cache = model.init_cache(b, p + max_new_tokens)
    key, sub = jax.random.split(key)
    out = np.asarray(fn(params, jnp.asarray(ids), jnp.asarray(mask), cache, sub, eos_id))
    for row in out[:n]:
      row = list(row)
      results.append(row[: row.index(eos_id)] if eos_id in row else row)
  return results


def generate_text(loaded, params, prompts: Sequence[str], **kwargs) -> list[str]:
  """Text in, text out, for a ``jlora.finetune.model.LoadedModel``."""
  tok = loaded.tokenizer
  ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
  out = generate_ids(loaded.model, params, ids, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, **kwargs)
  return [tok.decode(o, skip_special_tokens=True) for o in out]


def _is_peft_dir(path: str) -> bool:
  import os

  return os.path.exists(os.path.join(path, "adapter_config.json"))


def _load_any_adapter(path: str, loaded):
  if not _is_peft_dir(path):
    return jlora.load_adapter(path, loaded.params)
  from jlora import peft as peft_lib

  ids = jnp.zeros((1, 4), jnp.int32)
  layout = jlora.infer_layout(loaded.forward, loaded.params, ids, jnp.ones_like(ids))
  return peft_lib.load(path, loaded.params, model_type=loaded.model.config.model_type, layout=layout)


def main(argv: Sequence[str] | None = None) -> int:
  from jlora.finetune import model as model_lib
  from jlora.finetune.config import DEFAULT_MODEL

  ap = argparse.ArgumentParser(prog="python -m jlora.generate", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--adapter", action="append", default=[],
                  help="adapter directory, jlora or Hugging Face PEFT format (repeatable)")
  ap.add_argument("--model", default="", help="base model directory (default: the adapter's base)")
  ap.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
  ap.add_argument("--max-new-tokens", type=int, default=32)
  ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  if not args.prompt:
    ap.error("give at least one --prompt")
  model_dir = args.model
  if not model_dir and args.adapter:
    first = args.adapter[0]
    if _is_peft_dir(first):
      from jlora import peft as peft_lib

      model_dir = peft_lib.read_config(first).get("base_model_name_or_path", "")
    else:
      meta = jlora.read_adapter_metadata(first)
      model_dir = meta.get("base_model_dir") or meta.get("base_model", "")
  loaded = model_lib.load(model_dir or DEFAULT_MODEL)
  kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)

  def show(label: str, params: Any) -> None:
    for prompt, text in zip(args.prompt, generate_text(loaded, params, args.prompt, **kw)):
      print(f"[{label}] {prompt!r} -> {text!r}")

  show("base", loaded.params)
  for path in args.adapter:
    lp = _load_any_adapter(path, loaded)  # same base arrays, new factors
    show(f"{path} (unmerged)", lp)
    show(f"{path} (merged)", jlora.merge(lp))
  return 0


if __name__ == "__main__":
  sys.exit(main())
