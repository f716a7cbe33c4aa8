"""Run by test_logprobs.py in a process with 4 fake CPU devices: a data-parallel batch stays split in the head.

Prints one JSON line: the per-device FLOPs of the gradient of summed token log-probs with the rows
sharded over the devices, chunked (one block: XLA's cost model counts a loop body once) and
materialised, and the shapes of the compiled matmuls' outputs.
"""

from __future__ import annotations

import json
import re

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jlora import objectives as ob

B, T, D, V = 8, 64, 32, 1024


def main():
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rows = NamedSharding(mesh, P("data"))
  h = jax.device_put(jax.random.normal(jax.random.key(0), (B, T, D)), rows)
  w = jax.device_put(jax.random.normal(jax.random.key(1), (D, V)), NamedSharding(mesh, P()))
  labels = jax.device_put(jax.random.randint(jax.random.key(2), (B, T), 0, V), rows)
  out = {}
  for name, fn in (("chunked", lambda h: ob.token_logprobs(h, ob.Head(w), labels, chunk_size=B * T)),
                   ("full", lambda h: ob.token_logprobs_full(h, ob.Head(w), labels))):
    compiled = jax.jit(jax.grad(lambda h: fn(h).sum())).lower(h).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    dots = sorted(set(re.findall(r"f32\[([0-9,]+)\][^ ]* dot\(", compiled.as_text())))
    out[name] = {"flops": cost["flops"], "dots": dots}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
