"""Converts a transformers 4.x Flax checkpoint (``flax_model.msgpack``) to safetensors.

  python examples/convert_flax_checkpoint.py SRC_DIR [DST_DIR]   # DST defaults to SRC (in place)

``jlora.models.load`` reads the Flax weights (no transformers model class),
``jlora.models.save`` writes ``model.safetensors`` + ``config.json``; the other
files (tokenizer, generation config) are copied. When transformers 4.x with its
Flax classes is installed, the logits of both checkpoints are compared on a
fixed batch and the result printed; the bundled tiny base was converted this way.
"""

from __future__ import annotations

import argparse
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

import jlora.models


def flax_logits(directory: str, ids: np.ndarray) -> np.ndarray | None:
  try:
    import transformers

    cls = transformers.FlaxAutoModelForCausalLM
  except (ImportError, AttributeError):  # transformers 5 has no Flax classes
    return None
  model = cls.from_pretrained(directory)
  return np.asarray(model(jnp.asarray(ids)).logits)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("src")
  ap.add_argument("dst", nargs="?")
  args = ap.parse_args()
  dst = args.dst or args.src
  model, params = jlora.models.load(args.src)
  ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 64))
  want = flax_logits(args.src, ids)
  got = np.asarray(jax.jit(model.__call__)(params, jnp.asarray(ids)))
  if dst != args.src:
    shutil.copytree(args.src, dst, ignore=shutil.ignore_patterns("flax_model.msgpack*"), dirs_exist_ok=True)
  jlora.models.save(dst, model, params)
  back_model, back = jlora.models.load(dst)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  if want is not None:
    print(f"logits: native vs transformers Flax: max abs diff {np.abs(got - want).max():.3g} "
          f"(max |logit| {np.abs(want).max():.3g}); argmax equal: {bool((got.argmax(-1) == want.argmax(-1)).all())}")
  if dst == args.src:
    os.remove(os.path.join(dst, "flax_model.msgpack"))
  print(f"wrote {os.path.join(dst, 'model.safetensors')}")


if __name__ == "__main__":
  main()
