"""Training checkpoints: adapters + optimizer state + step + rng, via Orbax CheckpointManager.

Only the adapters are saved, never the frozen base. Each checkpoint carries the
same self-describing metadata as ``jlora.save_adapter`` (ranks, alphas,
scaling, layouts, base model id and weights fingerprint) plus the training
config, so a checkpoint is refused by a run on another base model.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from jlora import _checkpoint as ck
from jlora._partition import split


class TrainCheckpointer:
  def __init__(self, directory: str, *, keep: int, save_every: int):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, *, adapters, opt_state, rng, meta: dict, force: bool = False) -> bool:
    state = {
        "adapters": ck.adapter_state(adapters),
        "opt_state": list(jax.tree.leaves(opt_state)),
        "step": np.int64(step),
        "rng": np.asarray(jax.random.key_data(rng)),
    }
    meta = {**meta, "step": int(step), "data_position": int(step)}
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore(self, step: int, *, base_params, adapters_template, opt_state_template, rng_template):
    """Returns ``(adapters, opt_state, rng, meta)``; checks base model and LoRA config first."""
    where = f"checkpoint {self.directory}/{step}"
    meta = self.read_meta(step)
    ck.verify_base(meta, base_params, where=where)
    current = ck.adapter_metadata(adapters_template, base_fingerprint="")["adapters"]
    if meta["adapters"] != current:
      raise ck.AdapterMismatchError(
          f"{where} was written with other adapters (targets, ranks or layouts) than this run "
          "configures; use the same LoRA options, or a new --output-dir.")
    abstract = {
        "adapters": jax.tree.map(_abstract, ck.adapter_state(adapters_template)),
        "opt_state": [_abstract(x) for x in jax.tree.leaves(opt_state_template)],
        "step": jax.ShapeDtypeStruct((), np.int64),
        "rng": _abstract(np.asarray(jax.random.key_data(rng_template))),
    }
    state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
    adapters = split(ck.attach(base_params, meta, state["adapters"], where=where))[0]
    treedef = jax.tree.structure(opt_state_template)
    opt_state = jax.tree.unflatten(treedef, state["opt_state"])
    rng = jax.random.wrap_key_data(np.asarray(state["rng"]))
    return adapters, opt_state, rng, meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()



def _abstract(x) -> jax.ShapeDtypeStruct:
  sharding = x.sharding if isinstance(x, jax.Array) else None
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
