"""Bytes moved by collectives per train step: LoRA vs full fine-tuning under FSDP on 8 devices.

Reads the compiled HLO of one jitted train step (loss + grads + AdamW) for the benchmark Llama
(d=512, ffn 1376, 4 layers, vocab 1024, batch 8x256) with every matrix sharded over an fsdp=8
mesh, and sums the result sizes of all-reduce / all-gather / reduce-scatter / all-to-all /
collective-permute ops. Deterministic (no timing).

  python benchmarks/collectives.py     # sets XLA_FLAGS for 8 fake CPU devices itself
  python benchmarks/collectives.py --smoke   # tiny model (batch 8x16), a few seconds: does it still run?

Results go to benchmarks/results/collectives.json (--smoke: nowhere, unless --out).
"""

from __future__ import annotations

import os

# 8 fake CPU devices, other XLA flags kept (setdefault left a set XLA_FLAGS as it was: the 8-device assert failed).
if "--xla_force_host_platform_device_count=" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jlora  # noqa: E402
import jlora.sharding as jsh  # noqa: E402
from _common import (ALL_LINEAR, ALPHA, LLAMA, RANK, SEQ, SMOKE_LLAMA, SMOKE_SEQ, add_smoke_flag,  # noqa: E402
                     write_result)

warnings.filterwarnings("ignore")
BATCH = 8


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_smoke_flag(ap)
  args = ap.parse_args(argv)
  import transformers

  assert jax.device_count() == 8, "run with 8 devices"
  config, seq = (SMOKE_LLAMA, SMOKE_SEQ) if args.smoke else (LLAMA, SEQ)
  model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**config), seed=0)
  fwd = lambda p, ids: model(ids, params=p).logits
  mesh = jsh.make_mesh("fsdp=8")
  specs = jsh.partition_specs(model.params, jsh.preset_rules("fsdp"), mesh=mesh)
  params = jsh.put(model.params, specs, mesh)
  ids = jax.device_put(jax.random.randint(jax.random.key(0), (BATCH, seq), 0, config["vocab_size"]),
                       NamedSharding(mesh, P(jsh.DATA_AXES, None)))
  tx = optax.adamw(1e-4)

  def loss_fn(f, p, ids):
    logits = f(p, ids)[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def full_step(p, s, ids):
    g = jax.grad(functools.partial(loss_fn, fwd))(p, ids)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  cfg = jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=rf".*/({'|'.join(ALL_LINEAR)})/kernel")
  lp = jsh.init_sharded(jax.random.key(1), params, cfg, mesh)
  adapters, frozen = jlora.split(lp)
  ltx = jlora.optimizer(tx, adapters)
  wrapped = jlora.wrap(fwd)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def lora_step(a, s, frozen, ids):
    g = jax.grad(lambda a: loss_fn(wrapped, jlora.combine(a, frozen), ids))(a)
    u, s = ltx.update(g, s, a)
    return optax.apply_updates(a, u), s

  full = jsh.collective_bytes(full_step.lower(params, tx.init(params), ids).compile())
  lora = jsh.collective_bytes(lora_step.lower(adapters, ltx.init(adapters), frozen, ids).compile())
  result = {
      "config": {**config, "batch": BATCH, "seq": seq, "rank": RANK, "mesh": "fsdp=8", "preset": "fsdp"},
      "full_ft_bytes": full, "lora_bytes": lora,
      "full_ft_total": sum(full.values()), "lora_total": sum(lora.values()),
      "reduce_bytes_full": full["all-reduce"] + full["reduce-scatter"],
      "reduce_bytes_lora": lora["all-reduce"] + lora["reduce-scatter"],
  }
  result["lora_over_full_total"] = result["lora_total"] / result["full_ft_total"]
  result["lora_over_full_reduce"] = result["reduce_bytes_lora"] / max(result["reduce_bytes_full"], 1)
  write_result("collectives", result, args=args)


if __name__ == "__main__":
  main()
