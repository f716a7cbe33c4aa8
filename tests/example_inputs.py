"""Inputs the examples' smoke runs need, written the way their users would have them.

  python tests/example_inputs.py flax-checkpoint DIR     # a tiny transformers 4.x Flax Llama (flax_model.msgpack)
  python tests/example_inputs.py adapters OUT TASK...    # OUT/TASK/adapter: jlora adapters of the bundled base

``flax-checkpoint`` is what ``examples/convert_flax_checkpoint.py`` converts (a directory saved by
``FlaxLlamaForCausalLM.save_pretrained``). ``adapters`` writes what the fine-tuning command would
leave in ``OUT/TASK/adapter`` (rank 2 on all linear layers, random non-zero factors), so that
``examples/lorahub_words.py --smoke`` trains only the tasks it is not given.
"""

from __future__ import annotations

import os
import sys

TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, rms_norm_eps=1e-6)


def flax_checkpoint(directory: str) -> None:
  import transformers

  model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA), seed=0)
  model.save_pretrained(directory)
  print(f"wrote {os.path.join(directory, 'flax_model.msgpack')}")


def adapters(out: str, tasks: list[str]) -> None:
  import jax

  import jlora
  from jlora.finetune import model as model_lib
  from jlora.finetune.config import DEFAULT_MODEL

  loaded = model_lib.load(DEFAULT_MODEL)
  cfg = jlora.LoraConfig(rank=2, alpha=4, targets=loaded.resolve_targets("all-linear"))
  for i, task in enumerate(tasks):
    key_a, key_b = jax.random.split(jax.random.key(100 + i))
    lp = jlora.init(key_a, loaded.params, cfg, layout=loaded.layout)
    lp = jax.tree.map(lambda w: w.replace(b=0.1 * jax.random.normal(key_b, w.b.shape, w.b.dtype))
                      if isinstance(w, jlora.LoraWeight) else w, lp,
                      is_leaf=lambda w: isinstance(w, jlora.LoraWeight))
    path = jlora.save_adapter(os.path.join(out, task, "adapter"), lp, base_model=loaded.model_id)
    print(f"wrote {path}")


def main() -> int:
  what, *args = sys.argv[1:]
  if what == "flax-checkpoint":
    flax_checkpoint(*args)
  elif what == "adapters":
    adapters(args[0], args[1:])
  else:
    raise SystemExit(f"unknown input {what!r}: flax-checkpoint or adapters")
  return 0


if __name__ == "__main__":
  sys.exit(main())
