"""Text generation with a base model, a base + adapter (unmerged) or a merged model.

  python -m jlora.generate --adapter runs/default/adapter --prompt "Reverse the words: a b c"
  python -m jlora.generate --adapter A1 --adapter A2 --prompt "..."   # one base, adapters swapped

The base is loaded once; every adapter is attached to the same base arrays
(``jlora.load_adapter`` / ``jlora.peft.load``), so switching adapters costs no
reload. For each prompt the command prints the base model's output, then for
each adapter the unmerged (low-rank path) and merged (``jlora.merge``) outputs.
Supported families run on ``jlora.models`` (KV-cache generation).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import jlora


def generate_text(loaded, params, prompts: Sequence[str], *, max_new_tokens: int = 32, temperature: float = 0.0,
                  seed: int = 0) -> list[str]:
  """Text in, text out, for a ``jlora.finetune.model.LoadedModel`` (adapters served unmerged)."""
  tok = loaded.tokenizer
  ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
  out = loaded.generate(params, ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
  return [tok.decode(o, skip_special_tokens=True) for o in out]


def _is_peft_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, "adapter_config.json"))


def _load_any_adapter(path: str, loaded):
  if not _is_peft_dir(path):
    return jlora.load_adapter(path, loaded.params)
  from jlora import peft as peft_lib

  return peft_lib.load(path, loaded.params, module_map=loaded.module_map, layout=loaded.layout)


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
