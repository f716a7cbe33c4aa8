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
from jlora.finetune.config import TrainConfig

_initialized = False


def _multihost_tpu_env() -> bool:
  hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
  return len([h for h in hosts.split(",") if h.strip()]) > 1


def initialize(cfg: TrainConfig) -> None:
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


def make_mesh_and_shardings(cfg: TrainConfig, params: Any):
  """Returns ``(mesh, place)``: the device mesh (None on one device) and a function that
  puts a base parameter tree onto it with the configured sharding preset."""
  if jax.device_count() == 1 and not cfg.mesh:
    return None, lambda p: p
  from jlora import sharding

  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.preset_rules(cfg.sharding, mesh)

  def place(p):
    specs = sharding.partition_specs(p, rules)
    return sharding.put(p, specs, mesh)

  return mesh, place


def init_adapters(key, base_params, lora_cfg: jlora.LoraConfig, layout, mesh):
  """``jlora.init`` — on a mesh, adapters are created already sharded like their kernels."""
  if mesh is None:
    return jlora.init(key, base_params, lora_cfg, layout=layout)
  from jlora import sharding

  return sharding.init_sharded(key, base_params, lora_cfg, mesh, layout=layout)


def global_batch(local: dict, mesh) -> dict:
  """This process's rows of the batch -> one global array sharded over the data axes."""
  if mesh is None:
    return jax.tree.map(jnp.asarray, local)
  from jlora import sharding

  return sharding.batch_from_process_local(local, mesh)


def gather(tree: Any) -> Any:
  """A tree whose arrays are fully addressable on this host (for saving / generation)."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)
