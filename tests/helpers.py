"""Test helpers: an independent dense oracle (NumPy, float64) and adapter randomisation."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

import jlora


# XLA:CPU's LLVM code generation at -O0 for the subprocesses that run the commands and the
# device-count checks: their programs are tiny, so compiling costs far more than running (the
# short fine-tuning run's step: 5.4 s to compile at the default level, 2.0 s at 0). Only code
# generation changes, not the HLO passes (fusion, buffer assignment: memory and cost analyses
# are the same), but float rounding may differ, so the test processes themselves, which check
# bit-exact properties such as "B = 0 is the base", keep the default level users run at.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def command_env(devices: int | None = None) -> dict:
  """The environment for a subprocess running a command or a check: fast compilation and,
  given ``devices``, that many fake CPU devices (other XLA flags kept).

  ``USE_TORCH=0`` keeps transformers (imported for its tokenizers) from importing PyTorch,
  as on a user's machine, where jlora does not install it: torch is only the tests'
  reference, and importing it cost each subprocess about 6 s of its 25 s.
  """
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith(("--xla_force_host_platform_device_count=", "--xla_backend_optimization_level="))]
  flags.append(FAST_COMPILE)
  env = {**os.environ, "USE_TORCH": "0"}
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def randomize(lora_params, key, *, scale: float = 0.5):
  """Gives every adapter random non-zero A and B (B = 0 after init hides bugs)."""
  leaves = [x for x in jax.tree.leaves(lora_params, is_leaf=jlora.LoraWeight.__instancecheck__)
            if isinstance(x, jlora.LoraWeight)]
  keys = iter(jax.random.split(key, 2 * len(leaves)))

  def fill(x):
    if not isinstance(x, jlora.LoraWeight):
      return x
    a = scale * jax.random.normal(next(keys), x.a.shape, x.a.dtype)
    b = scale * jax.random.normal(next(keys), x.b.shape, x.b.dtype)
    return x.replace(a=a, b=b)

  return jax.tree.map(fill, lora_params, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))


def oracle_kernel(w: jlora.LoraWeight) -> np.ndarray:
  """W0 + scale·(A⊗B) computed densely in float64 with NumPy from the layout alone."""
  spec = w.spec
  nd = len(spec.shape)
  a = np.asarray(w.a, np.float64)
  b = np.asarray(w.b, np.float64)
  batch, ins, outs = spec.batch_axes, spec.in_axes, spec.out_axes
  in_size = int(np.prod([spec.shape[i] for i in ins]))
  out_size = int(np.prod([spec.shape[i] for i in outs]))
  bsz = int(np.prod([spec.shape[i] for i in batch])) if batch else 1
  a2 = a.reshape(bsz, in_size, spec.rank)
  b2 = b.reshape(bsz, spec.rank, out_size)
  d = np.matmul(a2, b2)  # (batch, in, out)
  d = d.reshape(*[spec.shape[i] for i in batch], *[spec.shape[i] for i in ins],
                *[spec.shape[i] for i in outs])
  order = list(batch) + list(ins) + list(outs)
  d = np.transpose(d, np.argsort(order))
  assert d.shape == spec.shape[:nd]
  return np.asarray(w.w0, np.float64) + spec.scale * d


def oracle_params(lora_params):
  """Plain params with each LoraWeight replaced by its dense oracle kernel (W0's dtype)."""
  def dense(x):
    if isinstance(x, jlora.LoraWeight):
      return jnp.asarray(oracle_kernel(x), dtype=x.w0.dtype)
    return x

  return jax.tree.map(dense, lora_params, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))


def assert_close(actual, expected, *, rtol: float, atol: float):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)
