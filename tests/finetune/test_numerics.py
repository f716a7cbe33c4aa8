"""--reproducible: the pinned XLA:CPU flags are accepted by this jaxlib and change what it compiles."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import jax.numpy as jnp
import pytest

from jlora.finetune import numerics

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="the flags are for x86-64 only; pin() says so elsewhere")

COMPILE = ("import jax, jax.numpy as jnp; "
           "f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum()); "
           "print(f.lower(jnp.ones((64, 128)), jnp.ones((128, 256))).compile().as_text())")


def _compiled(pin: bool) -> subprocess.CompletedProcess:
  code = ("from jlora.finetune import numerics; print(numerics.pin()); " if pin else "") + COMPILE
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "XLA_FLAGS": ""})


def test_pin_before_jax_starts_takes_effect():
  unpinned, pinned = _compiled(False), _compiled(True)
  assert unpinned.returncode == 0 and pinned.returncode == 0, pinned.stderr[-2000:]  # XLA knows every flag
  assert "__ynn_fusion" in unpinned.stdout  # what the pin removes: a kernel chosen at run time for this CPU
  assert pinned.stdout.startswith("pinned: --xla_cpu_max_isa=AVX2") and "__ynn_fusion" not in pinned.stdout


def test_pin_after_jax_started_says_it_did_not(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "")
  jnp.ones(1).block_until_ready()  # JAX has started in this process
  assert numerics.pin().startswith("not pinned: JAX had started before the run")
  assert os.environ["XLA_FLAGS"] == ""


RSQRT = ("import numpy as np, jax; {pin}"
         "x = np.abs(np.random.default_rng(0).standard_normal(4096)).astype(np.float32) + np.float32(1e-3); "
         "got = np.asarray(jax.jit(jax.lax.rsqrt)(x)); want = np.float32(1) / np.sqrt(x); "
         "print((got != want).sum())")


def test_pinned_rsqrt_is_the_correctly_rounded_one():
  """Pinned, rsqrt (every RMSNorm's) is IEEE 1/sqrt(x): the same bits on every CPU. Unpinned, XLA uses
  the CPU's approximate rsqrt instruction refined by a Newton step, whose bits are the vendor's (on an
  AMD EPYC 1,346 of these 4,096 differed from the correctly rounded value)."""
  code = RSQRT.format(pin="from jlora.finetune import numerics; numerics.pin(); ")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "XLA_FLAGS": ""})
  assert res.returncode == 0, res.stderr[-2000:]
  assert int(res.stdout.split()[-1]) == 0
