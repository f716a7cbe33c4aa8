"""Reproducible runs on CPU: XLA:CPU flags that make the compiled programs independent of the CPU model.

XLA:CPU compiles for the machine it runs on, and three of its choices change float
rounding with the CPU model (measured on the bundled run; see the README):

* its code generator uses every vector extension the CPU has (``--xla_cpu_max_isa``)
  and a preferred vector width, which decide how reductions are split;
* it fuses matmuls, elementwise ops and reductions into YNNPACK kernels that
  YNNPACK picks at run time for the CPU it finds (AVX2, AVX-512, AMX, ...);
* "platform-dependent math": ``rsqrt`` (every RMSNorm) is the CPU's approximate
  reciprocal square root instruction plus a Newton step. The instruction's bits are
  the vendor's own (only its error bound is specified), so Intel and AMD round
  differently: on an AMD EPYC 32% of the results differed from the correctly rounded
  ``1/sqrt(x)`` by 1-2 ulp. With it off, XLA computes ``1/sqrt(x)`` with IEEE
  division and square root, correctly rounded on every CPU.

Rounding differences grow over hundreds of optimizer steps into a different
adapter and different greedy generations: the bundled run printed eval loss 0.0093
on an Intel Xeon and 0.0101 on an AMD EPYC with the first two pins alone. ``pin()``
fixes all three: code generation for AVX2 (every x86-64 server CPU since 2013) with
256-bit vectors, no YNNPACK fusions (matmuls then run in Eigen, compiled into jaxlib
for one ISA), and no platform-dependent math. What it cannot fix: Eigen splits a matmul over the
intra-op thread pool, one thread per core, and JAX offers no way to size that
pool, so results are identical across machines with the same number of cores
(machines of one kind), not across core counts. The flags only concern
XLA:CPU (GPU and TPU programs are unchanged).
"""

from __future__ import annotations

import os
import platform

# The flags, for the XLA of the jaxlib release they were verified with: XLA aborts on an
# unknown flag, so they are only set for that release.
VERIFIED_JAXLIB = "0.10."
CPU_FLAGS = (
    "--xla_cpu_max_isa=AVX2",
    "--xla_cpu_prefer_vector_width=256",
    "--xla_cpu_experimental_ynn_fusion_type=",  # empty: no YNNPACK fusions at all
    "--xla_cpu_enable_platform_dependent_math=false",  # rsqrt as IEEE 1/sqrt, not the vendor's estimate
)


def _backend_started() -> bool:
  from jax._src import xla_bridge

  return bool(xla_bridge._backends)


def pin() -> str:
  """Adds ``CPU_FLAGS`` to ``XLA_FLAGS`` (flags the user set win); returns what happened, in words.

  Must run before JAX creates its backends (the first computation); the
  fine-tuning command calls it first thing. It changes this process's
  environment, so it is not called here.

  Example:
    >>> from jlora.finetune import numerics
    >>> numerics.CPU_FLAGS[0]
    '--xla_cpu_max_isa=AVX2'
  """
  import jaxlib

  if platform.machine().lower() not in ("x86_64", "amd64"):
    return f"not pinned: the XLA:CPU flags are verified on x86-64 only, this is {platform.machine()}"
  if not jaxlib.__version__.startswith(VERIFIED_JAXLIB):
    return f"not pinned: the flags are verified with jaxlib {VERIFIED_JAXLIB}x, this is {jaxlib.__version__}"
  existing = os.environ.get("XLA_FLAGS", "").split()
  names = {f.split("=", 1)[0] for f in existing}
  missing = [f for f in CPU_FLAGS if f.split("=", 1)[0] not in names]
  overridden = [f for f in existing if f.split("=", 1)[0] in {c.split("=", 1)[0] for c in CPU_FLAGS}
                and f not in CPU_FLAGS]
  if missing and _backend_started():
    return ("not pinned: JAX had started before the run; run jlora-finetune, or set XLA_FLAGS='"
            + " ".join(CPU_FLAGS) + "' before JAX starts")
  os.environ["XLA_FLAGS"] = " ".join([*existing, *missing])
  return "pinned: " + " ".join(CPU_FLAGS) + (f" (XLA_FLAGS overrides: {' '.join(overridden)})" if overridden else "")
