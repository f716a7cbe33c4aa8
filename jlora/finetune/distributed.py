"""Process/mesh plumbing for the fine-tuning loop (single device up to multi-host).

With one device every function here is the identity; the multi-device and
multi-process paths use JAX's own runtime (``jax.distributed``, a global
``Mesh``, ``NamedSharding``) and ``jlora.sharding`` for the rules.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

import jlora
from jlora import sharding
from jlora.finetune.options import ModelOptions, ProcessOptions

_initialized = False


def _multihost_tpu_env() -> bool:
  hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
  return len([h for h in hosts.split(",") if h.strip()]) > 1


def initialize(cfg: ProcessOptions) -> None:
  """Calls ``jax.distributed.initialize`` when the run spans several processes.

  ``--coordinator HOST:PORT`` (with ``--num-processes``/``--process-id``) is explicit;
  ``--coordinator auto``, a ``JAX_COORDINATOR_ADDRESS`` environment variable, or a multi-host
  Cloud TPU slice (``TPU_WORKER_HOSTNAMES`` lists several hosts) let JAX find its peers.
  """
  global _initialized
  if _initialized:
    return
  if cfg.coordinator and cfg.coordinator != "auto":
    jax.distributed.initialize(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                               process_id=cfg.process_id)
  elif cfg.coordinator == "auto" or os.environ.get("JAX_COORDINATOR_ADDRESS") or _multihost_tpu_env():
    jax.distributed.initialize()
  else:
    return
  _initialized = True


def make_mesh(cfg: ModelOptions):
  """The device mesh of the run (``--mesh``; all devices on ``fsdp``), or None on one device."""
  if jax.device_count() == 1 and not cfg.mesh:
    return None
  return sharding.make_mesh(cfg.mesh)


def place(params: Any, cfg: ModelOptions, mesh) -> Any:
  """Puts a base parameter tree onto ``mesh`` with the configured sharding preset (identity without one)."""
  if mesh is None:
    return params
  specs = sharding.partition_specs(params, sharding.preset_rules(cfg.sharding, mesh))
  return sharding.put(params, specs, mesh)


def init_adapters(key, base_params, lora_cfg: jlora.LoraConfig, layout, mesh, *, from_values: bool = False):
  """``jlora.init`` as one compiled program (eagerly each factor shape compiles its own random
  kernel); on a mesh the adapters are created already sharded like their kernels.

  ``from_values``: the init reads the base (DoRA's norms, PiSSA's SVD, LoftQ...) and may replace
  it (a residual or quantized base); it then runs on the base arrays, and on a mesh the factors
  are placed with the shardings derived from their kernels afterwards.
  """
  if from_values:
    # Eager: kernel by kernel (one XLA:CPU program holding all the kernels' QR decompositions of
    # OLoRA hung in jax 0.10.2; each init method jits its own decomposition anyway).
    return place_adapters(jlora.init(key, base_params, lora_cfg, layout=layout), base_params, mesh)
  if mesh is None:
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base_params)
    strip = lambda w: w.replace(w0=None) if isinstance(w, jlora.LoraWeight) else None  # noqa: E731
    adapters = jax.jit(lambda k: jax.tree.map(strip, jlora.init(k, shapes, lora_cfg, layout=layout),
                                              is_leaf=lambda x: isinstance(x, jlora.LoraWeight)))(key)
    return sharding.attach_base(adapters, base_params)
  return sharding.init_sharded(key, base_params, lora_cfg, mesh, layout=layout)


def place_adapters(lora_params: Any, base_params: Any, mesh) -> Any:
  """A LoRA tree made eagerly (an init that read the base, or an adapter loaded from disk) ready to
  train: its trained arrays its own (the step donates them; an init may share an array between a
  trained and a frozen child, as OLoRA's A and its frozen copy) and, on a mesh, sharded like
  their kernels."""
  adapters, frozen = jlora.split(lora_params)
  adapters = jax.tree.map(lambda x: x.copy(), adapters)
  if mesh is None:
    return jlora.combine(adapters, frozen)
  specs = sharding.lora_specs(adapters, sharding.specs_of(base_params))
  return jlora.combine(jax.device_put(adapters, sharding.named(specs, mesh)), frozen)


def pinned(tree: Any, mesh) -> tuple[Any, Any]:
  """``(tree, shardings)``: every array of ``tree`` on ``mesh`` (those not yet on it replicated).

  The train step returns its adapters and optimizer state with exactly these shardings, so
  that its second call (and the evaluation after training) reuses the first compilation;
  left to the compiler, the outputs' shardings drift from the inputs' (an optimizer's
  step count starts on one device) and every drift is another compilation of the step.
  Without a mesh: ``(tree, None)``.
  """
  if mesh is None:
    return tree, None
  from jax.sharding import NamedSharding, PartitionSpec

  def own(x):
    s = getattr(x, "sharding", None)
    return s if isinstance(s, NamedSharding) and s.mesh == mesh else NamedSharding(mesh, PartitionSpec())

  shardings = jax.tree.map(own, tree)
  return jax.device_put(tree, shardings), shardings


def global_batch(local: dict, mesh) -> dict:
  """This process's rows of the batch -> one global array sharded over the data axes."""
  if mesh is None:
    return jax.tree.map(jnp.asarray, local)
  return sharding.batch_from_process_local(local, mesh)


def gather(tree: Any) -> Any:
  """A tree whose arrays are fully addressable on this host (for saving / generation)."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)
