"""Adapter-only checkpoints (Orbax) that describe themselves and their base model."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from jlora._config import KernelLayout
from jlora._lazy import is_lazy_node
from jlora._tree import leaves_with_paths, path_str
from jlora._variant import PLAIN, Variant
from jlora._weight import LoraSpec, LoraWeight, is_lora_weight, is_node
from jlora.sharding import child_specs

FORMAT = "jlora-adapter/1"
Params = Any

# The digest of a dense kernel's values for ``fingerprint``: ``digest(kernel, samples) -> bytes``.
# It is the NF4 codes of sampled blocks, which a 4-bit copy of the kernel stores bit for bit, so it
# lives with the 4-bit format: ``jlora.quant`` registers it when imported (``import jlora`` does).
_KERNEL_DIGEST: list[Callable[[Any, int], bytes]] = []


def register_kernel_digest(digest: Callable[[Any, int], bytes]) -> None:
  """Installs the digest ``fingerprint`` takes of dense kernels (``jlora.quant._fingerprint``)."""
  _KERNEL_DIGEST[:] = [digest]


class AdapterMismatchError(ValueError):
  """An adapter does not fit the base parameters it is loaded onto."""


def fingerprint(params: Params, *, samples: int = 1024) -> str:
  """A short, fast fingerprint of a base model's weights, whatever their storage.

  Hashes every leaf's path, shape and dtype plus about ``samples`` sampled
  values, so different pretrained weights (or a different architecture) give a
  different fingerprint without reading every byte of a large model. Kernels
  (floating leaves with >= 2 axes) are hashed by the NF4 codes of sampled
  blocks (``jlora.quant._fingerprint``), which a 4-bit ``jlora.NF4Weight`` of the
  same kernel stores bit for bit: the fingerprint of ``jlora.quantize(params,
  ...)`` equals that of ``params``, so an adapter trained with QLoRA loads onto
  the dense base and vice versa. Codes are relative to each block's absmax, so a
  kernel and a uniformly rescaled copy of it share a fingerprint (different pretrained
  weights do not). Adapters are ignored: the fingerprint of ``jlora.init(...)``
  output equals the base's.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> jlora.fingerprint({"w": jnp.ones((4, 4))}) == jlora.fingerprint({"w": jnp.ones((4, 4))})
    True
  """
  if not _KERNEL_DIGEST:  # pragma: no cover - jlora.quant registers it when imported
    raise RuntimeError("jlora.fingerprint needs jlora.quant (its kernel digest): import jlora.quant")
  kernel_digest = _KERNEL_DIGEST[0]
  h = hashlib.sha256()
  base = jax.tree_util.tree_map(lambda x: x.w0 if is_lora_weight(x) else x, params, is_leaf=is_lora_weight)
  for path, leaf in sorted(leaves_with_paths(base, is_leaf=is_lazy_node), key=lambda kv: kv[0]):
    digest = getattr(type(leaf), "__jlora_digest__", None)
    if digest is not None:  # a kernel stored in another form describes its dense values itself
      h.update(f"{path}|".encode() + digest(leaf, samples))
      continue
    if not hasattr(leaf, "shape"):
      continue
    if len(leaf.shape) >= 2 and jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating):
      h.update(f"{path}|".encode() + kernel_digest(leaf, samples))
      continue
    h.update(f"{path}|{tuple(leaf.shape)}|{np.dtype(leaf.dtype).name};".encode())
    if isinstance(leaf, jax.ShapeDtypeStruct):
      continue
    # A strided grid of about `samples` elements (no flattening: cheap on sharded arrays).
    per_axis = max(1, int(np.ceil(samples ** (1.0 / max(leaf.ndim, 1)))))
    sample = leaf[tuple(slice(0, None, max(1, d // per_axis)) for d in leaf.shape)]
    if isinstance(sample, jax.Array) and not sample.is_fully_addressable:
      from jax.experimental import multihost_utils

      sample = multihost_utils.process_allgather(sample, tiled=True)
    h.update(np.ascontiguousarray(np.asarray(sample, np.float32)).tobytes())
  return h.hexdigest()[:16]


def _spec_to_json(spec: LoraSpec) -> dict:
  d = {
      "shape": list(spec.shape), "rank": spec.rank, "alpha": spec.alpha, "rslora": spec.rslora,
      "dropout": spec.dropout, "scale": spec.scale,
      "layout": {"in_axes": list(spec.layout.in_axes), "batch_axes": list(spec.layout.batch_axes),
                 "embedding": spec.layout.embedding},
  }
  if spec.variant != PLAIN:
    d["variant"] = spec.variant.to_json()
  return d


def _spec_from_json(d: Mapping) -> LoraSpec:
  lay = d["layout"]
  return LoraSpec(
      shape=tuple(d["shape"]), rank=int(d["rank"]), alpha=float(d["alpha"]), rslora=bool(d["rslora"]),
      dropout=float(d.get("dropout", 0.0)),
      layout=KernelLayout(in_axes=tuple(lay["in_axes"]), batch_axes=tuple(lay["batch_axes"]),
                          embedding=bool(lay["embedding"])),
      variant=Variant.from_json(d.get("variant")),
  )


def adapter_weights(params: Params) -> dict[str, LoraWeight]:
  """``{path: LoraWeight}`` for every adapter in the tree, in tree order."""
  return {p: x for p, x in leaves_with_paths(params, is_leaf=is_lora_weight) if is_lora_weight(x)}


def _nest(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    parts = path.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = value
  return out


def adapter_state(params: Params) -> dict:
  """The adapter children as a nested dict ``{...: {"a": A, "b": B, ...}}`` (what is saved).

  Everything but the frozen base ``w0`` is saved: the factors and a variant's own
  children, trained or not.
  """
  weights = adapter_weights(params)
  if not weights:
    raise ValueError("the tree holds no LoraWeight; create adapters with jlora.init first.")
  return _nest({p: dict(w.factors) for p, w in weights.items()})


def adapter_metadata(params: Params, *, base_model: str = "", base_fingerprint: str | None = None,
                     extra: Mapping[str, Any] | None = None) -> dict:
  """JSON metadata describing every adapter and the base it belongs to."""
  weights = adapter_weights(params)
  return {
      "format": FORMAT,
      "base_model": base_model,
      "base_fingerprint": fingerprint(params) if base_fingerprint is None else base_fingerprint,
      "adapters": {p: _spec_to_json(w.spec) for p, w in weights.items()},
      **(dict(extra) if extra else {}),
  }


TRANSPLANT_FIX = "Load the matching base model, or pass check_base=False if you really mean to transplant it."


def verify_base(meta: Mapping[str, Any], params: Params, *, where: str, fix: str = TRANSPLANT_FIX) -> None:
  """Raises ``AdapterMismatchError`` unless ``params`` is the base ``meta`` was saved for.

  ``fix`` ends the message: what the caller's user can do (an option of the
  function or command that loads the adapter).
  """
  want = meta.get("base_fingerprint")
  if not want:
    return
  got = fingerprint(params)
  if want != got:
    raise AdapterMismatchError(
        f"{where}: this adapter was trained on base model {meta.get('base_model') or '?'!r} "
        f"(weights fingerprint {want}), but the parameters it is being loaded onto have "
        f"fingerprint {got}. {fix}"
    )


def attach(params: Params, meta: Mapping[str, Any], state: Mapping[str, Any], *, where: str) -> Params:
  """Builds a LoRA tree from base ``params`` and saved adapter ``state`` / ``meta``."""
  specs = {p: _spec_from_json(d) for p, d in meta["adapters"].items()}
  flat_state = {p: x for p, x in leaves_with_paths(state)}
  found = set()

  def replace(path, leaf):
    p = path_str(path)
    if p not in specs:
      return leaf
    spec = specs[p]
    if is_lora_weight(leaf):
      raise AdapterMismatchError(f"{where}: {p!r} already holds an adapter; load onto plain base params.")
    if tuple(leaf.shape) != spec.shape:
      raise AdapterMismatchError(
          f"{where}: adapter {p!r} was made for a kernel of shape {spec.shape}, but the base "
          f"parameter has shape {tuple(leaf.shape)}.")
    found.add(p)
    kids = {n: flat_state[f"{p}/{n}"] for n in spec.factor_axes}
    return LoraWeight(leaf, kids.pop("a"), kids.pop("b"), spec, kids)

  out = jax.tree_util.tree_map_with_path(replace, params, is_leaf=is_node)  # a lazy (4-bit) kernel is one leaf
  missing = sorted(set(specs) - found)
  if missing:
    raise AdapterMismatchError(
        f"{where}: the base parameters have no {missing[0]!r}"
        + (f" (and {len(missing) - 1} more adapter paths)" if len(missing) > 1 else "")
        + "; is this the right base model?")
  return out


def _abstract_state(meta: Mapping[str, Any], params: Params = None) -> dict:
  """Restore targets for the factors; sharded like their base kernels when those are sharded."""
  bases = dict(leaves_with_paths(params, is_leaf=is_node)) if params is not None else {}
  flat = {}
  for p, d in meta["adapters"].items():
    spec = _spec_from_json(d)
    dtypes = d.get("dtypes") or {}
    base = bases.get(p)
    base_sharding = getattr(base, "sharding", None)
    if isinstance(base_sharding, NamedSharding):
      shardings = {n: NamedSharding(base_sharding.mesh, s)
                   for n, s in child_specs(spec, base_sharding.spec).items()}
    else:  # next to an unsharded base (whatever mesh the checkpoint was written from)
      single = jax.sharding.SingleDeviceSharding(
          next(iter(base_sharding.device_set)) if base_sharding is not None else jax.local_devices()[0])
      shardings = {n: single for n in spec.factor_axes}
    for name, shape in spec.factor_shapes.items():
      dtype = np.dtype(dtypes.get(name, d.get("dtype", "float32")))
      flat[f"{p}/{name}"] = jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[name])
  return _nest(flat)


def save_adapter(directory: str, params: Params, *, base_model: str = "",
                 extra: Mapping[str, Any] | None = None, base_fingerprint: str | None = None) -> str:
  """Saves only the adapters of ``params`` (Orbax) with self-describing metadata.

  The metadata records, per adapter, its rank, alpha, scaling mode and layout,
  and the base model's id and weights fingerprint, so that ``load_adapter``
  can rebuild the tree and refuse a different base.

  Args:
    directory: target directory (created; overwritten if it exists).
    params: a LoRA tree from ``jlora.init``.
    base_model: an id for the base (a hub name or a path), stored as metadata.
    extra: more JSON-serialisable metadata (e.g. the training config).
    base_fingerprint: ``jlora.fingerprint`` of the base if already computed.

  Returns:
    The absolute path written.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, tempfile, os
    >>> lp = jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4))}, jlora.LoraConfig(rank=2, targets="w"))
    >>> d = jlora.save_adapter(os.path.join(tempfile.mkdtemp(), "adapter"), lp, base_model="demo")
    >>> jlora.load_adapter(d, {"w": jnp.ones((4, 4))})["w"].spec.rank
    2
  """
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  meta = adapter_metadata(params, base_model=base_model, base_fingerprint=base_fingerprint, extra=extra)
  for p, w in adapter_weights(params).items():
    meta["adapters"][p]["dtype"] = np.dtype(w.a.dtype).name
    meta["adapters"][p]["dtypes"] = {n: np.dtype(v.dtype).name for n, v in w.factors.items()}
  ckpt = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  ckpt.save(directory, args=ocp.args.Composite(
      adapters=ocp.args.StandardSave(adapter_state(params)), meta=ocp.args.JsonSave(meta)), force=True)
  return directory


def read_adapter_metadata(directory: str) -> dict:
  """The JSON metadata of a saved adapter (no arrays are read).

  Example:
    >>> import jax, jax.numpy as jnp, jlora, tempfile, os
    >>> lp = jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4))}, jlora.LoraConfig(rank=2, targets="w"))
    >>> d = jlora.save_adapter(os.path.join(tempfile.mkdtemp(), "a"), lp, base_model="demo")
    >>> meta = jlora.read_adapter_metadata(d)
    >>> meta["base_model"], meta["adapters"]["w"]["rank"]
    ('demo', 2)
  """
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no adapter checkpoint at {directory!r}")
  ckpt = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  meta = ckpt.restore(directory, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ValueError(f"{directory!r} is not a jlora adapter checkpoint (format {FORMAT!r}).")
  return meta


def load_adapter(directory: str, params: Params, *, check_base: bool = True) -> Params:
  """Loads an adapter saved by ``save_adapter`` onto base ``params``.

  When the base kernels are sharded (``NamedSharding``), each factor is
  restored directly onto the matching sharding (see ``jlora.sharding``), so an
  adapter saved on one mesh loads onto another.

  Raises:
    AdapterMismatchError: the base has a different fingerprint (unless
      ``check_base=False``), lacks an adapted path, or has other shapes.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, tempfile, os
    >>> base = {"w": jnp.ones((4, 4))}
    >>> lp = jlora.init(jax.random.key(0), base, jlora.LoraConfig(rank=2, targets="w"))
    >>> d = jlora.save_adapter(os.path.join(tempfile.mkdtemp(), "a"), lp)
    >>> jlora.load_adapter(d, base)["w"].b.shape
    (2, 4)
    >>> try:
    ...   jlora.load_adapter(d, {"w": jnp.zeros((4, 4))})  # another base
    ... except jlora.AdapterMismatchError as e:
    ...   print(type(e).__name__)
    AdapterMismatchError
  """
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  meta = read_adapter_metadata(directory)
  if check_base:
    verify_base(meta, params, where=f"jlora.load_adapter({directory!r})")
  ckpt = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  state = ckpt.restore(directory, args=ocp.args.Composite(
      adapters=ocp.args.StandardRestore(_abstract_state(meta, params)))).adapters
  return attach(params, meta, state, where=f"jlora.load_adapter({directory!r})")

