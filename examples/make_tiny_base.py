"""Builds the bundled default base model: a tiny Llama pretrained on local text.

Everything is offline and reproducible: the text is the Python documentation
shipped with CPython (``pydoc_data.topics``), the tokenizer is a byte-level BPE
trained on it with the ``tokenizers`` library, and the model is a 4-layer
Llama-style causal LM (about 1M parameters, ~4 MB), ``jlora.models``' native
decoder, trained from scratch with plain JAX + optax for a few minutes on 2 CPU
cores.

  python examples/make_tiny_base.py                  # writes jlora/assets/tiny-base
  python examples/make_tiny_base.py --steps 200 --out /tmp/tb   # quicker, elsewhere
  python examples/make_tiny_base.py --smoke --out /tmp/tb        # a toy model in seconds: does it still run?

The output directory is a regular Hugging Face model directory
(``config.json``, ``model.safetensors``, tokenizer files) that
``jlora.models.load`` and ``transformers.AutoModelForCausalLM.from_pretrained`` load.
(The bundled copy was trained by an earlier version of this script with
transformers' FlaxLlamaForCausalLM and converted by
``examples/convert_flax_checkpoint.py``: the same architecture; logits agree to 1e-6.)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "jlora", "assets", "tiny-base")
EOS = "<|endoftext|>"
# The bundled model's shape and training run, and --smoke's: a toy model trained for 2 steps on
# 20 documentation topics (the smallest vocabulary a byte-level BPE allows is 257).
MODEL = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, head_dim=32, max_position_embeddings=256)
SMOKE_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
RUN = dict(vocab=1024, steps=1500, batch=32, seq=128, topics=None)
SMOKE_RUN = dict(vocab=300, steps=2, batch=2, seq=16, topics=20)


CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|endoftext|>\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")

def corpus(topics: int | None = None) -> list[str]:
  """The CPython documentation's topics (the first ``topics`` of them, sorted by name)."""
  from pydoc_data.topics import topics as docs

  return [docs[k] for k in sorted(docs)[:topics]]


def train_tokenizer(texts: list[str], vocab_size: int):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  # A causal LM reads no token_type_ids: without this, tok(text, return_tensors="pt") passes them to
  # transformers' generate(), which refuses them.
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                 unk_token=EOS, model_input_names=["input_ids", "attention_mask"])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=None, help="default: jlora/assets/tiny-base (with --smoke: a new temporary "
                                              "directory; the bundled model is never overwritten by a smoke run)")
  ap.add_argument("--vocab", type=int, default=None, help=f"default: {RUN['vocab']}")
  ap.add_argument("--steps", type=int, default=None, help=f"default: {RUN['steps']}")
  ap.add_argument("--batch", type=int, default=None, help=f"default: {RUN['batch']}")
  ap.add_argument("--seq", type=int, default=None, help=f"default: {RUN['seq']}")
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--smoke", action="store_true",
                  help=f"a toy model ({SMOKE_MODEL['hidden_size']} wide, {SMOKE_MODEL['num_hidden_layers']} layer) "
                       f"trained for {SMOKE_RUN['steps']} steps on {SMOKE_RUN['topics']} topics: checks in seconds "
                       "that the script runs")
  args = ap.parse_args(argv)
  run = SMOKE_RUN if args.smoke else RUN
  for k in ("vocab", "steps", "batch", "seq"):
    if getattr(args, k) is None:
      setattr(args, k, run[k])
  if args.out is None:
    args.out = tempfile.mkdtemp(prefix="tiny-base-smoke-") if args.smoke else DEFAULT_OUT
  from tqdm import tqdm

  import jlora.models

  texts = corpus(run["topics"])
  tokenizer = train_tokenizer(texts, args.vocab)
  eos = tokenizer.eos_token_id
  ids = []
  for t in texts:
    ids.extend(tokenizer(t)["input_ids"])
    ids.append(eos)
  ids = np.asarray(ids, np.int32)
  n_val = len(ids) // 50
  train_ids, val_ids = ids[:-n_val], ids[-n_val:]
  print(f"corpus: {len(ids):,} tokens ({len(train_ids):,} train), vocab {len(tokenizer)}")

  config = jlora.models.ModelConfig.from_hf({
      "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": len(tokenizer),
      **(SMOKE_MODEL if args.smoke else MODEL), "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
      "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos, "tie_word_embeddings": False})
  model = jlora.models.Decoder(config)
  params = model.init(jax.random.key(args.seed))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  warmup = min(100, args.steps // 10)
  sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, args.steps, args.lr / 10)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
  opt_state = tx.init(params)

  def loss_fn(p, batch):
    logits = model(p, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  @jax.jit
  def step(p, s, batch):
    loss, g = jax.value_and_grad(loss_fn)(p, batch)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  rng = np.random.default_rng(args.seed)

  def sample(data, n):
    starts = rng.integers(0, len(data) - args.seq - 1, n)
    return jnp.asarray(np.stack([data[s:s + args.seq + 1] for s in starts]))

  t0 = time.time()
  bar = tqdm(range(args.steps), desc="pretrain")
  for i in bar:
    params, opt_state, loss = step(params, opt_state, sample(train_ids, args.batch))
    if i % 50 == 0:
      bar.set_postfix(loss=f"{float(loss):.3f}")
  val = float(np.mean([float(jax.jit(loss_fn)(params, sample(val_ids, args.batch))) for _ in range(8)]))
  print(f"params {n_params:,}; val loss {val:.3f} (ppl {np.exp(val):.1f}); {time.time() - t0:.0f}s")

  os.makedirs(args.out, exist_ok=True)
  jlora.models.save(args.out, model, params)
  # A plain-text chat template (user, assistant and system headers; EOS ends each turn), so that
  # conversations (OpenAI "messages") can be trained and prompted on the bundled base.
  tokenizer.chat_template = CHAT_TEMPLATE
  tokenizer.save_pretrained(args.out)
  with open(os.path.join(args.out, "pretraining.json"), "w") as f:
    json.dump({"source": "pydoc_data.topics (CPython stdlib)", "tokens": int(len(ids)),
               "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
               "seed": args.seed, "params": int(n_params), "val_loss": val,
               "script": "examples/make_tiny_base.py" + (" --smoke" if args.smoke else "")}, f, indent=2)
  print(f"wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
  main()
