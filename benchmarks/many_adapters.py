"""Many adapters on one base: a batch of 64 rows spread over 1, 4, 16 and 64 adapters.

Model: Llama-style, d=512, ffn 1376, 4 layers, vocab 1024 (transformers' Flax Llama on the
jlora side; the same weights in PyTorch for PEFT); LoRA r=8, alpha 16 on all 7 linear kinds.
Measured side by side in one run (interleaved rounds, medians):

* forward: 64 rows x 32 tokens; ``jlora.stack`` bank with ``adapter_ids`` (row i -> adapter
  i mod n) vs the same batch through one plain adapter (``jlora.wrap``) vs the merged base;
  PEFT's mixed-batch forward (``adapter_names=``) on PyTorch CPU with the same adapters
  (exported with ``jlora.peft.save``), and PEFT with one adapter;
* generation: 64 rows, 16-token prompts, 16 greedy new tokens with a KV cache;
* task switch: putting another adapter into a bank slot (jitted ``jlora.multi.put``, the bank
  donated so the slot is written in place) vs
  merging it into the base (jitted ``jlora.merge``) vs loading a merged model from disk
  (safetensors).

  python benchmarks/many_adapters.py            # results/many_adapters.json
  python benchmarks/many_adapters.py --smoke    # tiny model, 8 rows over 1 and 4 adapters: does it still run?
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import jlora
import jlora.multi
import jlora.peft
from _common import (ALL_LINEAR, LLAMA, SMOKE_LLAMA, add_smoke_flag, block, interleaved_times, median, rounds_of,
                     write_result)

warnings.filterwarnings("ignore")

ROWS, SEQ, PROMPT, NEW, RANK, ALPHA = 64, 32, 16, 16, 8, 16
COUNTS = (1, 4, 16, 64)
MIX = 16  # the bank compared with PEFT's mixed batch and across selection strategies
CHECK_ROWS = (0, 5, 17)  # rows of the MIX-adapter batch checked against their adapter merged
SIZES = dict(llama=LLAMA, rows=ROWS, seq=SEQ, prompt=PROMPT, new=NEW, counts=COUNTS, mix=MIX, check_rows=CHECK_ROWS)
SMOKE_SIZES = dict(llama=SMOKE_LLAMA, rows=8, seq=16, prompt=8, new=4, counts=(1, 4), mix=4, check_rows=(0, 5, 7))


def flax_llama(tmp, llama: dict = LLAMA):
  import torch
  import transformers

  from jlora.finetune import model as model_lib

  torch.manual_seed(0)
  tm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama)).eval()
  d = os.path.join(tmp, "base")
  tm.save_pretrained(d, safe_serialization=True)
  tok = os.path.join(os.path.dirname(jlora.__file__), "assets", "tiny-base")
  for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    with open(os.path.join(tok, f)) as src, open(os.path.join(d, f), "w") as dst:
      dst.write(src.read())
  # transformers' Flax Llama (this benchmark drives its KV cache); jlora.models' own generation
  # is measured by examples/serve_many.py
  from jlora.finetune import hf_flax

  return hf_flax.load(d, bf16=False, remat=False, tokenizer=model_lib.load_tokenizer(d), model_id=d), d


def make_adapters(params, n):
  cfg = jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=rf".*/({'|'.join(ALL_LINEAR)})/kernel")
  out = []
  for i in range(n):
    lp = jlora.init(jax.random.key(i), params, cfg)
    out.append(jax.tree.map(lambda w: w.replace(b=jax.random.normal(jax.random.key(1000 + i), w.b.shape) * 0.02)
                            if isinstance(w, jlora.LoraWeight) else w, lp,
                            is_leaf=lambda w: isinstance(w, jlora.LoraWeight)))
  return out


def generate_fn(model, new: int = NEW):
  """Greedy prefill + decode with a KV cache, every call through jlora.wrap with ``**kw``."""

  def call(params, ids, mask, pos, cache):
    out = model(ids, attention_mask=mask, position_ids=pos, params=params, past_key_values=cache)
    return out.logits, out.past_key_values

  wrapped = jlora.wrap(call)

  def run(params, ids, kw, lora):
    step = (lambda *a: wrapped(*a, **kw)) if lora else call
    b, p = ids.shape
    mask = jnp.ones((b, p + new), jnp.int32)
    cache = model.init_cache(b, p + new)
    pos = jnp.broadcast_to(jnp.arange(p), (b, p))
    logits, cache = step(params, ids, mask, pos, cache)
    tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)

    def body(i, carry):
      out, tok, cache = carry
      logits, cache = step(params, tok[:, None], mask, jnp.full((b, 1), p + i - 1), cache)
      nxt = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
      return out.at[:, i].set(nxt), nxt, cache

    out = jnp.zeros((b, new), jnp.int32).at[:, 0].set(tok)
    return jax.lax.fori_loop(1, new, body, (out, tok, cache))[0]

  return jax.jit(run, static_argnums=3)


def peft_model(base_dir, adapters, tmp):
  import peft
  import torch
  import transformers

  torch.manual_seed(0)
  tm = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()
  pm = None
  for i, lp in enumerate(adapters):
    d = jlora.peft.save(os.path.join(tmp, f"peft{i}"), lp, model_type="llama")
    if pm is None:
      pm = peft.PeftModel.from_pretrained(tm, d, adapter_name="a0")
    else:
      pm.load_adapter(d, adapter_name=f"a{i}")
  return pm.eval()


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--no-peft", action="store_true")
  add_smoke_flag(ap)
  args = ap.parse_args(argv)
  sz = SMOKE_SIZES if args.smoke else SIZES
  n_rows, mix, counts = sz["rows"], sz["mix"], sz["counts"]
  tmp = tempfile.mkdtemp()
  loaded, base_dir = flax_llama(tmp, sz["llama"])
  params, model = loaded.params, loaded.model
  adapters = make_adapters(params, max(counts) + 1)
  spare = adapters.pop()
  fwd = lambda p, ids: model(ids, params=p).logits
  ids = jax.random.randint(jax.random.key(0), (n_rows, sz["seq"]), 0, sz["llama"]["vocab_size"])
  rows = jnp.arange(n_rows)
  merged = jlora.merge(adapters[0])
  banks = {n: jlora.stack(adapters[:n]) for n in counts}
  result: dict = {"config": {**sz["llama"], "rows": n_rows, "seq": sz["seq"], "prompt": sz["prompt"],
                             "new_tokens": sz["new"], "rank": RANK, "targets": list(ALL_LINEAR),
                             "counts": list(counts)}}

  # -- forward -------------------------------------------------------------------------------------------
  plain = jax.jit(fwd)
  single = jax.jit(jlora.wrap(fwd))
  mixed = jax.jit(lambda b, ids, a: jlora.wrap(fwd)(b, ids, adapter_ids=a))
  fns = {"merged": lambda: block(plain(merged, ids)), "single": lambda: block(single(adapters[0], ids))}
  for n, bank in banks.items():
    fns[f"bank_{n}"] = lambda bank=bank, n=n: block(mixed(bank, ids, rows % n))
  for s in ("gather", "onehot"):
    b_mix = jlora.stack(adapters[:mix], strategy=s)
    fns[f"bank_{mix}_{s}"] = lambda b_mix=b_mix: block(mixed(b_mix, ids, rows % mix))
  # correctness: each row of the MIX-adapter batch equals its own adapter merged
  got = np.asarray(mixed(banks[mix], ids, rows % mix))
  for r in sz["check_rows"]:
    want = np.asarray(plain(jlora.merge(adapters[r % mix]), ids[r:r + 1]))[0]
    np.testing.assert_allclose(got[r], want, rtol=1e-3, atol=1e-3)
  flops = {}
  for name, (fn, a) in {"merged": (plain, (merged, ids)), "single": (single, (adapters[0], ids)),
                        **{f"bank_{n}": (mixed, (banks[n], ids, rows % n)) for n in counts}}.items():
    c = fn.lower(*a).compile().cost_analysis()
    flops[name] = float((c[0] if isinstance(c, (list, tuple)) else c)["flops"])
  result["forward_xla_flops_over_single"] = {k: round(v / flops["single"], 4) for k, v in flops.items()}

  peft_fns = {}
  if not args.no_peft:
    import torch

    pm = peft_model(base_dir, adapters[:mix], tmp)
    tids = torch.as_tensor(np.asarray(ids))
    names = [f"a{i % mix}" for i in range(n_rows)]
    with torch.no_grad():  # the same adapters in both worlds compute the same logits
      want = pm(tids[:4], adapter_names=names[:4]).logits.numpy()
    np.testing.assert_allclose(got[:4], want, rtol=2e-3, atol=2e-3)

    def peft_mixed():
      with torch.no_grad():
        pm(tids, adapter_names=names)

    def peft_single():
      with torch.no_grad():
        pm.set_adapter("a0")
        pm(tids)

    peft_fns = {f"peft_mixed_{mix}": peft_mixed, "peft_single": peft_single}
    result["torch_threads"] = torch.get_num_threads()
  else:
    print("--no-peft: the PEFT peers are skipped", flush=True)
  times = interleaved_times({**fns, **peft_fns}, **rounds_of(args, args.rounds, warmup=1))
  tok = n_rows * sz["seq"]
  result["forward_tokens_per_s"] = {k: round(tok / median(v), 1) for k, v in times.items()}
  t_single = median(times["single"])
  result["forward_throughput_over_single"] = {k: round(t_single / median(v), 3) for k, v in times.items()}
  if peft_fns:
    result[f"forward_bank{mix}_over_peft_mixed{mix}"] = round(
        median(times[f"peft_mixed_{mix}"]) / median(times[f"bank_{mix}"]), 2)
  print(result, flush=True)

  # -- generation ----------------------------------------------------------------------------------------
  gen = generate_fn(model, sz["new"])
  prompts = ids[:, :sz["prompt"]]
  gfns = {"merged": lambda: block(gen(merged, prompts, {}, False)),
          "single": lambda: block(gen(adapters[0], prompts, {}, True))}
  for n, bank in banks.items():
    gfns[f"bank_{n}"] = lambda bank=bank, n=n: block(gen(bank, prompts, {"adapter_ids": rows % n}, True))
  times = interleaved_times(gfns, **rounds_of(args, args.rounds, warmup=1))
  result["generate_tokens_per_s"] = {k: round(n_rows * sz["new"] / median(v), 1) for k, v in times.items()}
  t_single = median(times["single"])
  result["generate_throughput_over_single"] = {k: round(t_single / median(v), 3) for k, v in times.items()}
  print(result, flush=True)

  # -- task switch -------------------------------------------------------------------------------------------
  from safetensors.numpy import load_file, save_file

  put = jax.jit(jlora.multi.put, donate_argnums=0)  # the slot is overwritten in place
  merge = jax.jit(jlora.merge)
  state = {"bank": jax.tree.map(jnp.copy, banks[mix])}

  def put_slot():
    state["bank"] = block(put(state["bank"], 3, spare))

  put_slot()
  block(merge(spare))
  flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(merge(spare))[0]}
  path = os.path.join(tmp, "merged.safetensors")
  save_file(flat, path)

  def reload():
    block([jax.device_put(x) for x in load_file(path).values()])

  switch = interleaved_times({"put_slot": put_slot,
                              "merge_into_base": lambda: block(merge(spare)),
                              "load_merged_from_disk": reload}, **rounds_of(args, max(args.rounds, 10), warmup=1))
  result["task_switch_ms"] = {k: round(1e3 * median(v), 2) for k, v in switch.items()}
  write_result("many_adapters", result, args=args)


if __name__ == "__main__":
  main()
