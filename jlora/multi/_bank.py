"""Banks of adapters on one base: ``stack``, ``put``, ``remove``, ``slots``, ``unstack``.

A bank is an ordinary LoRA tree whose ``LoraWeight``s have the ``Bank``
variant (see ``_variant``). Every kernel that any of the adapters targets
holds one slot per adapter; an adapter that does not target a kernel has a
zero slot there. Filling or emptying a slot changes arrays only (the static
spec stays), so a jitted function that takes the bank does not recompile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora._checkpoint import adapter_weights, fingerprint
from jlora._tree import leaves_with_paths, path_str
from jlora._variant import Variant
from jlora._weight import LoraSpec, LoraWeight, is_lora_weight, is_node
from jlora.multi._variant import Bank

Params = Any


def _plain_weights(tree: Params, what: str) -> dict[str, LoraWeight]:
  weights = adapter_weights(tree) if tree is not None else {}
  if not weights:
    raise ValueError(f"{what} holds no LoRA adapters (LoraWeight); create them with jlora.init or load them "
                     "with jlora.load_adapter / jlora.peft.load.")
  for path, w in weights.items():
    if isinstance(w.spec.variant, Bank):
      raise ValueError(f"{what}: {path!r} is already a bank of adapters; take its adapters out with "
                       "jlora.multi.unstack(bank, slot) first.")
    if type(w.spec.variant) is not Variant:
      raise ValueError(
          f"{what}: {path!r} is a {w.spec.variant.name!r} adapter; a bank serves plain LoRA adapters only "
          f"(a {w.spec.variant.name!r} adapter is not a low-rank term that can be selected per example). "
          "Merge it into its own base with jlora.merge, or serve it alone.")
    if not w.is_complete:
      raise ValueError(f"{what}: {path!r} is missing a part ({w!r}); use jlora.combine(adapters, frozen) first.")
  return weights


def _base_leaves(tree: Params) -> dict[str, Any]:
  base = jax.tree_util.tree_map(lambda x: x.w0 if is_lora_weight(x) else x, tree, is_leaf=is_lora_weight)
  return dict(leaves_with_paths(base))


def check_same_base(trees: Sequence[Params], names: Sequence[str], *, where: str) -> None:
  """Raises ``ValueError`` unless all ``trees`` are adapters of one base (same leaves and weights)."""
  ref = _base_leaves(trees[0])
  ref_fp = None
  for tree, name in zip(trees[1:], names[1:]):
    leaves = _base_leaves(tree)
    if leaves.keys() != ref.keys():
      extra = sorted(set(leaves) ^ set(ref))
      raise ValueError(f"{where}: {name} and {names[0]} are on different base models: parameter {extra[0]!r} is "
                       "in one tree only. All adapters must be on the same base.")
    for p, x in leaves.items():
      y = ref[p]
      if tuple(getattr(x, "shape", ())) != tuple(getattr(y, "shape", ())) or getattr(x, "dtype", None) != getattr(
          y, "dtype", None):
        raise ValueError(f"{where}: {name} and {names[0]} are on different base models: {p!r} has shape/dtype "
                         f"{getattr(x, 'shape', None)}/{getattr(x, 'dtype', None)} vs "
                         f"{getattr(y, 'shape', None)}/{getattr(y, 'dtype', None)}.")
    if all(leaves[p] is ref[p] for p in ref):
      continue  # the very same base arrays
    if any(isinstance(x, jax.core.Tracer) for x in leaves.values()):
      continue  # abstract (under jit): shapes were checked
    ref_fp = ref_fp or fingerprint(trees[0])
    fp = fingerprint(tree)
    if fp != ref_fp:
      raise ValueError(
          f"{where}: {name} was trained on another base than {names[0]} (weights fingerprint {fp} vs "
          f"{ref_fp}); all adapters must be on the same base model.")


def _check_layout(path: str, w: LoraWeight, ref: LoraWeight, name: str, where: str) -> None:
  if w.spec.shape != ref.spec.shape or w.spec.layout != ref.spec.layout:
    raise ValueError(f"{where}: {name}'s adapter at {path!r} has layout {w.spec.layout} (kernel {w.spec.shape}), "
                     f"another has {ref.spec.layout} ({ref.spec.shape}); adapters of one kernel must share "
                     "its layout (create them with the same jlora.infer_layout).")


def _pad_rank(x: jax.Array, axis: int, rank: int) -> jax.Array:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, rank - x.shape[axis])
  return jnp.pad(x, pad)


def _slot_parts(w: LoraWeight | None, spec: LoraSpec, dtype: Any) -> dict[str, jax.Array]:
  """One slot's children (slot axis of size 1) at a bank kernel of ``spec``; zeros if ``w`` is None."""
  shapes = spec.factor_shapes
  nb = len(spec.batch_axes)
  one = {n: tuple(1 if i == nb else s for i, s in enumerate(shape)) for n, shape in shapes.items()}
  if w is None:
    return {"a": jnp.zeros(one["a"], dtype), "b": jnp.zeros(one["b"], dtype),
            "scales": jnp.zeros(one["scales"], jnp.float32), "ranks": jnp.zeros(one["ranks"], jnp.int32)}
  a = _pad_rank(jnp.asarray(w.a, dtype), w.a.ndim - 1, spec.rank)
  b = _pad_rank(jnp.asarray(w.b, dtype), nb, spec.rank)
  return {"a": jnp.expand_dims(a, nb), "b": jnp.expand_dims(b, nb),
          "scales": jnp.full(one["scales"], w.spec.scale, jnp.float32),
          "ranks": jnp.full(one["ranks"], w.spec.rank, jnp.int32)}


def stack(adapters: Sequence[Params], *, slots: int | None = None, rank: int | None = None,
          strategy: str = "auto") -> Params:
  """Stacks LoRA trees of one base into a bank served per example with ``adapter_ids``.

  Slot ``i`` holds ``adapters[i]``. Ranks are zero-padded to the largest (or
  ``rank``) per kernel, each adapter keeps its own scale (``alpha/r``, or
  ``alpha/√r`` for rsLoRA, per rule), and a kernel some adapters do not target
  gets zero slots for them. ``jlora.wrap(f)(bank, x, adapter_ids=ids)`` then
  runs row ``i`` of the batch with adapter ``ids[i]`` (``-1``: base only).
  LoRA dropout (training with ``lora_rng``) uses the largest of the adapters'
  rates at each kernel.

  Args:
    adapters: LoRA trees (``jlora.init`` / ``load_adapter`` / ``jlora.peft.load``)
      on the same base model.
    slots: the bank's capacity (default ``len(adapters)``); free slots are
      empty until ``jlora.multi.put`` fills them.
    rank: pad every kernel to this rank instead of the largest adapter rank,
      to leave room for adapters ``put`` later.
    strategy: the per-example selection (``jlora.Bank.strategy``).

  Returns:
    The bank: the base tree with ``jlora.Bank`` ``LoraWeight``s.

  Raises:
    ValueError: adapters on different bases (shapes or weights fingerprint),
      a non-plain adapter (e.g. DoRA), a rank above ``rank``, too few slots.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> p = {"w": jnp.ones((8, 8))}
    >>> a = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=2, targets="w"))
    >>> b = jlora.init(jax.random.key(1), p, jlora.LoraConfig(rank=4, targets="w", rslora=True))
    >>> bank = jlora.stack([a, b])
    >>> bank["w"].a.shape, bank["w"].factors["ranks"].tolist()
    ((2, 8, 4), [2, 4])
  """
  adapters = list(adapters)
  if not adapters:
    raise ValueError("jlora.stack: give at least one adapter tree.")
  names = [f"adapters[{i}]" for i in range(len(adapters))]
  weights = [_plain_weights(t, f"jlora.stack: {n}") for t, n in zip(adapters, names)]
  check_same_base(adapters, names, where="jlora.stack")
  n = len(adapters) if slots is None else slots
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < len(adapters):
    raise ValueError(f"jlora.stack: slots={slots!r} must be an integer >= the number of adapters "
                     f"({len(adapters)}).")
  variant = Bank(slots=int(n), strategy=strategy)
  paths = [p for p, _ in leaves_with_paths(adapters[0], is_leaf=is_node)]
  union = [p for p in paths if any(p in w for w in weights)]
  banks: dict[str, LoraWeight] = {}
  for path in union:
    present = [(i, ws[path]) for i, ws in enumerate(weights) if path in ws]
    ref = present[0][1]
    for i, w in present:
      _check_layout(path, w, ref, names[i], "jlora.stack")
    top = max(w.spec.rank for _, w in present)
    if rank is not None and top > rank:
      i = next(i for i, w in present if w.spec.rank == top)
      raise ValueError(f"jlora.stack: {names[i]} has rank {top} at {path!r}, above rank={rank}; raise rank.")
    r = top if rank is None else int(rank)
    spec = LoraSpec(shape=ref.spec.shape, layout=ref.spec.layout, rank=r, alpha=float(r), rslora=False,
                    dropout=max(w.spec.dropout for _, w in present), variant=variant)
    dtype = jnp.result_type(*[w.a for _, w in present], *[w.b for _, w in present])
    by_slot = dict(present)
    parts = [_slot_parts(by_slot.get(i), spec, dtype) for i in range(int(n))]
    nb = len(spec.batch_axes)
    kids = {k: jnp.concatenate([p[k] for p in parts], axis=nb) for k in ("a", "b", "scales", "ranks")}
    banks[path] = LoraWeight(ref.w0, kids.pop("a"), kids.pop("b"), spec, kids)

  def replace(p, leaf):
    s = path_str(p)
    if s in banks:
      return banks[s]
    return leaf.w0 if is_lora_weight(leaf) else leaf

  return jax.tree_util.tree_map_with_path(replace, adapters[0], is_leaf=is_node)


def _bank_weights(bank: Params, what: str) -> dict[str, LoraWeight]:
  weights = adapter_weights(bank) if bank is not None else {}
  banks = {p: w for p, w in weights.items() if isinstance(w.spec.variant, Bank)}
  if not banks:
    raise ValueError(f"{what}: the tree holds no bank of adapters; build one with jlora.stack([...]).")
  return banks


def _check_slot(slot: Any, slots: int, what: str) -> None:
  if isinstance(slot, jax.core.Tracer):
    return
  if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < slots:
    raise ValueError(f"{what}: slot {slot!r} is not in 0..{slots - 1} (the bank's capacity is {slots}).")


def _set_slot(w: LoraWeight, slot: Any, parts: dict[str, jax.Array]) -> LoraWeight:
  nb = len(w.spec.batch_axes)
  new = {k: lax.dynamic_update_slice_in_dim(w.factors[k], parts[k].astype(w.factors[k].dtype), slot, axis=nb)
         for k in ("a", "b", "scales", "ranks")}
  return w.replace(**new)


def put(bank: Params, slot: int, adapter: Params | None) -> Params:
  """A new bank with ``adapter`` in ``slot`` (``None`` empties it); the shapes, hence compiled code, stay.

  Under ``jax.jit`` the slot may be a traced integer.

  Args:
    bank: a bank from ``jlora.stack``.
    slot: the slot to fill (its previous adapter is replaced).
    adapter: a LoRA tree on the bank's base, or ``None``.

  Returns:
    The new bank (the input is not modified).

  Raises:
    ValueError: the adapter targets a kernel the bank has no slots for, its
      rank exceeds the bank's padded rank there, it is on another base, or the
      slot is out of range.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, jlora.multi
    >>> p = {"w": jnp.ones((8, 8))}
    >>> a = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=2, targets="w"))
    >>> bank = jlora.stack([a], slots=4)
    >>> jlora.multi.slots(jlora.multi.put(bank, 3, a))
    [0, 3]
  """
  banks = _bank_weights(bank, "jlora.multi.put")
  slots = next(iter(banks.values())).spec.variant.slots
  _check_slot(slot, slots, "jlora.multi.put")
  weights: dict[str, LoraWeight] = {}
  if adapter is not None:
    weights = _plain_weights(adapter, "jlora.multi.put: adapter")
    check_same_base([bank, adapter], ["the bank", "the adapter"], where="jlora.multi.put")
    for path, w in weights.items():
      if path not in banks:
        raise ValueError(f"jlora.multi.put: the adapter targets {path!r}, which the bank has no slots for; "
                         "build a bank that includes it with jlora.stack([...]).")
      _check_layout(path, w, banks[path], "the adapter", "jlora.multi.put")
      if w.spec.rank > banks[path].spec.rank:
        raise ValueError(f"jlora.multi.put: the adapter's rank at {path!r} is {w.spec.rank}, above the bank's "
                         f"padded rank {banks[path].spec.rank}; build the bank with jlora.stack(..., rank=...).")
  new = {p: _set_slot(b, slot, _slot_parts(weights.get(p), b.spec, b.a.dtype)) for p, b in banks.items()}

  def replace(p, leaf):
    return new.get(path_str(p), leaf)

  return jax.tree_util.tree_map_with_path(replace, bank, is_leaf=is_node)


def remove(bank: Params, slot: int) -> Params:
  """A new bank with ``slot`` emptied (its rows then compute the base only).

  Example:
    >>> import jax, jax.numpy as jnp, jlora, jlora.multi
    >>> p = {"w": jnp.ones((8, 8))}
    >>> a = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=2, targets="w"))
    >>> jlora.multi.slots(jlora.multi.remove(jlora.stack([a, a]), 0))
    [1]
  """
  return put(bank, slot, None)


def slots(bank: Params) -> list[int]:
  """The occupied slots of a bank (a slot is empty when none of its kernels holds an adapter).

  Example:
    >>> import jax, jax.numpy as jnp, jlora, jlora.multi
    >>> a = jlora.init(jax.random.key(0), {"w": jnp.ones((8, 8))}, jlora.LoraConfig(rank=2, targets="w"))
    >>> jlora.multi.slots(jlora.stack([a], slots=3))
    [0]
  """
  banks = _bank_weights(bank, "jlora.multi.slots")
  used = None
  for w in banks.values():
    nb = len(w.spec.batch_axes)
    r = np.asarray(w.factors["ranks"]).reshape(-1, w.spec.variant.slots) if nb else np.asarray(w.factors["ranks"])[None]
    u = (r > 0).any(axis=0)
    used = u if used is None else used | u
  return [int(i) for i in np.flatnonzero(used)]


def unstack(bank: Params, slot: int) -> Params:
  """The adapter in ``slot`` as a plain LoRA tree on the bank's base (inverse of ``stack``).

  Each kernel gets the slot's factors at its own rank (padding removed) and its
  scale (as ``alpha = scale·rank`` without rsLoRA: the same update); kernels the
  adapter did not target are plain base kernels again.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, jlora.multi
    >>> p = {"w": jnp.ones((8, 8))}
    >>> a = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=2, targets="w"))
    >>> b = jlora.init(jax.random.key(1), p, jlora.LoraConfig(rank=4, targets="w"))
    >>> jlora.multi.unstack(jlora.stack([a, b]), 0)["w"].a.shape
    (8, 2)
  """
  banks = _bank_weights(bank, "jlora.multi.unstack")
  slots_n = next(iter(banks.values())).spec.variant.slots
  _check_slot(slot, slots_n, "jlora.multi.unstack")
  if isinstance(slot, jax.core.Tracer):
    raise ValueError("jlora.multi.unstack: the slot must be a concrete integer (the ranks are static).")
  out: dict[str, Any] = {}
  for path, w in banks.items():
    nb = len(w.spec.batch_axes)
    ranks = np.unique(np.take(np.asarray(w.factors["ranks"]), slot, axis=nb))
    scales = np.unique(np.take(np.asarray(w.factors["scales"]), slot, axis=nb))
    if len(ranks) != 1 or len(scales) != 1:
      raise ValueError(f"jlora.multi.unstack: slot {slot} of {path!r} has different ranks or scales across its "
                       "stacked layers, which one LoRA spec cannot describe.")
    r = int(ranks[0])
    if r == 0:
      out[path] = w.w0
      continue
    a = lax.index_in_dim(w.a, slot, axis=nb, keepdims=False)[..., :r]
    b = lax.slice_in_dim(lax.index_in_dim(w.b, slot, axis=nb, keepdims=False), 0, r, axis=nb)
    scale = float(scales[0])
    spec = dataclasses.replace(w.spec, rank=r, alpha=scale * r, rslora=False, variant=Variant())
    out[path] = LoraWeight(w.w0, a, b, spec)

  def replace(p, leaf):
    return out.get(path_str(p), leaf)

  return jax.tree_util.tree_map_with_path(replace, bank, is_leaf=is_node)
