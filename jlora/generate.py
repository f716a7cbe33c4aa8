"""Text generation with a base model, a base + adapter (unmerged) or a merged model.

  jlora-generate --adapter runs/default/adapter --prompt "Reverse the words: a b c"
  jlora-generate --adapter A1 --adapter A2 --prompt P1 --prompt P2   # one base, one batch

The base is loaded once; every adapter is attached to the same base arrays
(``jlora.load_adapter`` / ``jlora.peft.load``), so switching adapters costs no
reload. On the native decoder (``jlora.models``: Llama, Mistral, Qwen2/3,
Gemma) the adapters are stacked into one bank (``jlora.stack``) and every
(prompt, adapter) row, the base's rows included, is generated in ONE batched
KV-cache generation, each row with its own adapter (``adapter_ids``; the base
matmuls are shared). For each prompt the command prints the base model's
output, then for each adapter its unmerged (low-rank path) output and, unless
``--no-merged``, its merged output (``jlora.merge``: one more generation per
adapter, a check of the low-rank path; greedy outputs agree). Adapters a bank
cannot hold (DoRA and other variants) and models on the transformers-Flax
fallback (GPT-2, ...) are generated one adapter at a time. With
``--temperature > 0`` a row's sample depends on the batch it is drawn in.
An adapter that records its base model's fingerprint is refused on another
base (``--no-check-base`` overrides); a PEFT adapter that records none is
loaded with a warning. User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax

import jlora
from jlora.data import chat_prompt_ids
from jlora.finetune import adapters as adapters_lib
from jlora.finetune import model as model_lib
from jlora.finetune.cli import ArgumentParser, UserError, run_command
from jlora.finetune.options import DEFAULT_MODEL


def generate_text(loaded, params, prompts: Sequence[str], *, max_new_tokens: int = 32, temperature: float = 0.0,
                  seed: int = 0, adapter_ids: Sequence[int] | None = None, chat_template: bool = False) -> list[str]:
  """Text in, text out, for a ``jlora.finetune.model.LoadedModel`` (adapters served unmerged).

  Args:
    loaded: the model (``jlora.finetune.model.load``).
    params: its base parameters, a LoRA tree, or a bank (``jlora.stack``).
    prompts: the prompt texts.
    max_new_tokens, temperature, seed: as ``LoadedModel.generate``.
    adapter_ids: with a bank, each prompt's slot (``-1``: the base); one batch.
    chat_template: each prompt as one user turn of the tokenizer's chat template (as
      ``jlora-finetune --chat-template`` trained it), followed by the assistant's header.

  Returns:
    The continuation of each prompt.

  Example:
    >>> import jax, jlora
    >>> from jlora.finetune import model as model_lib
    >>> from jlora.finetune.config import DEFAULT_MODEL
    >>> loaded = model_lib.load(DEFAULT_MODEL)
    >>> lp = jlora.init(jax.random.key(0), loaded.params, jlora.LoraConfig(
    ...   rank=2, targets=loaded.resolve_targets("all-linear")), layout=loaded.layout)
    >>> a, b = generate_text(loaded, jlora.stack([lp]), ["a b", "a b"], max_new_tokens=3, adapter_ids=[0, -1])
    >>> a == b  # B = 0: the adapter does not change the base's output yet
    True
  """
  tok = loaded.tokenizer
  if chat_template:
    ids = [chat_prompt_ids(tok, p) for p in prompts]
  else:
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
  kw = {} if adapter_ids is None else {"adapter_ids": adapter_ids}
  out = loaded.generate(params, ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, **kw)
  return [tok.decode(o, skip_special_tokens=True) for o in out]


def _bankable(lp: Any) -> bool:
  """True when a bank can hold the adapter (plain LoRA only: no DoRA or other variant)."""
  is_lw = lambda x: isinstance(x, jlora.LoraWeight)
  weights = [w for w in jax.tree.leaves(lp, is_leaf=is_lw) if is_lw(w)]
  return bool(weights) and all(type(w.spec.variant) is jlora.Variant and w.is_complete for w in weights)


def serve(loaded, adapters: Sequence[Any], prompts: Sequence[str], **kw: Any) -> tuple[list[str], list[list[str]]]:
  """The base's and every adapter's (unmerged) continuations of ``prompts``, batched where possible.

  On the native decoder the adapters a bank can hold are stacked into one
  bank (``jlora.stack``) and all ``(1 + len(adapters)) × len(prompts)`` rows,
  the base's (slot ``-1``) included, are generated in one batch; the other
  adapters (DoRA, ...; every adapter on the transformers-Flax fallback) one
  at a time.

  Args:
    loaded: the model (``jlora.finetune.model.load``).
    adapters: LoRA trees on ``loaded.params``.
    prompts: the prompt texts.
    **kw: ``max_new_tokens``, ``temperature``, ``seed`` (see ``generate_text``).

  Returns:
    ``(base_texts, [texts of adapter i for i in ...])``, each a list over prompts.

  Example:
    >>> import jax, jlora
    >>> from jlora.finetune import model as model_lib
    >>> from jlora.finetune.config import DEFAULT_MODEL
    >>> loaded = model_lib.load(DEFAULT_MODEL)
    >>> lp = jlora.init(jax.random.key(0), loaded.params, jlora.LoraConfig(
    ...   rank=2, targets=loaded.resolve_targets("all-linear")), layout=loaded.layout)
    >>> base, (texts,) = serve(loaded, [lp], ["a b"], max_new_tokens=3)
    >>> texts == base  # B = 0: the adapter does not change the base's output yet
    True
  """
  n = len(prompts)
  slots = [i for i, lp in enumerate(adapters) if loaded.native and _bankable(lp)]
  texts: list[list[str] | None] = [None] * len(adapters)
  if slots:
    bank = jlora.stack([adapters[i] for i in slots])
    ids = [s for s in range(-1, len(slots)) for _ in range(n)]
    out = generate_text(loaded, bank, list(prompts) * (len(slots) + 1), adapter_ids=ids, **kw)
    base = out[:n]
    for s, i in enumerate(slots):
      texts[i] = out[(s + 1) * n:(s + 2) * n]
  else:
    base = generate_text(loaded, loaded.params, prompts, **kw)
  for i, lp in enumerate(adapters):
    if texts[i] is None:
      texts[i] = generate_text(loaded, lp, prompts, **kw)
  return base, texts


PROG = "jlora-generate"
# The end of every "wrong base" error: the options of this command that fix it.
CHECK_BASE_FIX = ("Pass --model with the base model it was trained on (and --bf16 if it was trained with --bf16), "
                  "or --no-check-base to load it anyway.")


def _parser():
  ap = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--adapter", action="append", default=[], metavar="DIR",
                  help="Adapter directory, jlora (output_dir/adapter) or Hugging Face PEFT (output_dir/peft) "
                       "format; repeatable: every adapter is attached to the one loaded base.")
  ap.add_argument("--model", default="", metavar="DIR",
                  help="Base model directory (default: the one the first adapter records, else the bundled "
                       "tiny base model).")
  ap.add_argument("--prompt", action="append", default=[], help="Prompt text; repeatable (at least one).")
  ap.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="Longest continuation (default: 32).")
  ap.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature; 0 = greedy (default: 0).")
  ap.add_argument("--seed", type=int, default=0, help="Seed of the sampling (default: 0).")
  ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                  help="Load the base in bfloat16 (default: as the first jlora adapter was trained, else "
                       "float32). The base fingerprint check needs the dtype the adapter was trained on.")
  ap.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                  help="Format each prompt as a user turn of the tokenizer's chat template, followed by the "
                       "assistant's header (default: as the first jlora adapter was trained, else no).")
  ap.add_argument("--merged", action=argparse.BooleanOptionalAction, default=True,
                  help="Also generate with each adapter merged into the base (one generation per adapter; "
                       "default: true), a check of the batched low-rank outputs; --no-merged serves only "
                       "the batch.")
  ap.add_argument("--check-base", action=argparse.BooleanOptionalAction, default=True,
                  help="Refuse an adapter whose recorded base fingerprint is another model's (default: true); "
                       "--no-check-base loads it anyway.")
  return ap


def main(argv: Sequence[str] | None = None) -> int:
  """``jlora-generate``: user errors print one line on stderr and exit with status 2."""
  return run_command(PROG, lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
  ap = _parser()
  args = ap.parse_args(argv)
  if not args.prompt:
    ap.error("give at least one --prompt")
  if args.max_new_tokens < 1:
    ap.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  if args.temperature < 0:
    ap.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
  kinds = [adapters_lib.kind(path) for path in args.adapter]  # every adapter is checked before any model loads
  infos = [adapters_lib.info(path, kind) for path, kind in zip(args.adapter, kinds)]
  model_dir = args.model or (infos[0]["model_dir"] if infos else "") or DEFAULT_MODEL
  if not os.path.isdir(model_dir):
    if args.model:
      raise UserError(f"--model {args.model!r} is not a directory; give a local Hugging Face model directory")
    raise UserError(f"--adapter {args.adapter[0]!r} records its base model as {model_dir!r}, which is not a local "
                    "directory here; pass --model with a local copy of that model")
  bf16 = args.bf16 if args.bf16 is not None else bool(infos and infos[0]["bf16"])
  try:
    loaded = model_lib.load(model_dir, bf16=bf16)
  except FileNotFoundError as e:  # the loader's "no weights" (or a tokenizer file missing)
    raise UserError(f"--model {model_dir!r}: {e}") from None
  adapters = [(path, adapters_lib.load(path, kind, loaded, check_base=args.check_base, fix=CHECK_BASE_FIX))
              for path, kind in zip(args.adapter, kinds)]
  chat = args.chat_template if args.chat_template is not None else bool(infos and infos[0]["chat_template"])
  if chat:
    print("prompts: formatted with the tokenizer's chat template "
          + ("(--chat-template)" if args.chat_template else "(as the first adapter was trained; --no-chat-template "
                                                            "sends them as they are)"))
  kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, chat_template=chat)

  def show(label: str, texts: Sequence[str]) -> None:
    for prompt, text in zip(args.prompt, texts):
      print(f"[{label}] {prompt!r} -> {text!r}")

  base, unmerged = serve(loaded, [lp for _, lp in adapters], args.prompt, **kw)
  show("base", base)
  for (path, lp), texts in zip(adapters, unmerged):
    show(f"{path} (unmerged)", texts)
    if args.merged:
      show(f"{path} (merged)", generate_text(loaded, jlora.merge(lp), args.prompt, **kw))
  return 0


if __name__ == "__main__":
  sys.exit(main())
