"""AdaLoRA (Zhang et al. 2023): SVD-form adapters whose ranks a budget schedule prunes.

An AdaLoRA adapter stores ``P`` (``a``, the right singular vectors, shape
``(*batch, *in, r)``), ``Λ`` (``e``, the singular values, ``(*batch, r)``) and ``Q``
(``b``, the left singular vectors, ``(*batch, r, *out)``); its update is PEFT's
``ΔW = Q·(Λ ⊙ P) · alpha / (r + 1e-5)`` (``lora_alpha / ranknum``, ``ranknum`` being
the initial rank). A frozen child ``rank_mask`` (``(*batch, r)``, 1 = kept) records
the final rank pattern (``jlora.variants.adalora_finalize``): it is what is saved,
exported as PEFT's ``rank_pattern`` and used to convert the adapter to a plain LoRA
with per-kernel ranks (``jlora.variants.to_lora``). The pruning itself is done by
the optimizer (``jlora.variants.adalora``), so it cannot be forgotten.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._apply.consumers.plans import DotPlan
from jlora._apply.context import ConsumerContext
from jlora._apply.lowrank import Letters, LowRank
from jlora._init_methods import register_init
from jlora._tree import leaves_with_paths
from jlora._variant import AxisSpec, Variant, lowrank_delta
from jlora._weight import LoraSpec, LoraWeight, is_lora_weight

Params = Any


def adalora_scale(spec: LoraSpec) -> float:
  """PEFT's ``scaling / (ranknum + 1e-5)`` with ``scaling = lora_alpha``, in float32 like PEFT."""
  return float(np.float32(spec.alpha) / (np.float32(spec.rank) + np.float32(1e-5)))


@dataclasses.dataclass(frozen=True)
class AdaLoRA(Variant):
  """AdaLoRA adapters: ``P`` (``a``), ``Λ`` (``e``), ``Q`` (``b``) and a frozen ``rank_mask``.

  Use ``jlora.LoraConfig(rank=init_r, alpha=..., variant=jlora.AdaLoRA())``; the
  factors are then initialised as PEFT does (``P, Q ~ N(0, 0.02)``, ``Λ = 0``).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> cfg = jlora.LoraConfig(rank=4, alpha=8, targets="w", variant=jlora.AdaLoRA())
    >>> w = jlora.init(jax.random.key(0), {"w": jnp.ones((6, 5))}, cfg)["w"]
    >>> {k: v.shape for k, v in w.factors.items()}
    {'a': (6, 4), 'b': (4, 5), 'e': (4,), 'rank_mask': (4,)}
  """

  name = "adalora"
  default_init = "adalora"

  def factor_axes(self, spec: LoraSpec) -> dict[str, AxisSpec]:
    return {**super().factor_axes(spec), "e": (*spec.batch_axes, "rank"),
            "rank_mask": (*spec.batch_axes, "rank")}

  def trainable(self, name: str) -> bool:
    return name != "rank_mask"

  def init_extras(self, spec: LoraSpec, w0: Any, factors: Mapping[str, Any]) -> dict[str, Any]:
    if spec.rslora:
      raise ValueError("AdaLoRA scales by alpha / initial rank (PEFT ignores use_rslora); use rslora=False.")
    shape = spec.factor_shapes["e"]
    dtype = factors["a"].dtype
    return {"e": jnp.zeros(shape, dtype), "rank_mask": jnp.ones(shape, dtype)}

  # -- the apply path: plain LoRA with the effective factor a' = a·(Λ ⊙ mask)·(adalora/plain scale) --
  def _effective(self, v: LowRank) -> LowRank:
    spec = v.source.spec
    e = v.factors["e"] * v.factors["rank_mask"].astype(v.factors["e"].dtype)
    L = Letters()
    al = v.a_labels
    a = jnp.einsum(f"{L(al)},{L(v.flabels['e'])}->{L(al)}", v.a, e.astype(v.a.dtype))
    a = a * jnp.asarray(adalora_scale(spec) / spec.scale, a.dtype)
    return v._new(v.base, factors={**v.factors, "a": a})

  def dot(self, ctx: ConsumerContext, v: LowRank, x: Any, base_out: Any, plan: DotPlan) -> Any:
    return super().dot(ctx, self._effective(v), x, base_out, plan)

  def conv(self, ctx: ConsumerContext, v: LowRank, x: Any, base_out: Any, params: dict) -> Any:
    return super().conv(ctx, self._effective(v), x, base_out, params)

  def gather(self, ctx: ConsumerContext, v: LowRank, indices: Any, base_out: Any, params: dict) -> Any:
    return super().gather(ctx, self._effective(v), indices, base_out, params)

  def ragged_dot(self, ctx: ConsumerContext, v: LowRank, x: Any, group_sizes: Any, base_out: Any, plan: Any) -> Any:
    return super().ragged_dot(ctx, self._effective(v), x, group_sizes, base_out, plan)

  # -- merging -----------------------------------------------------------------------------
  def delta(self, w: LoraWeight, dtype: Any) -> Any:
    return lowrank_delta(effective_plain(w), dtype=dtype)


def _per_rank(spec: LoraSpec, x: Any, factor: str) -> Any:
  """A ``(*batch, r)`` array broadcast against factor ``factor`` (``a``: rank last, ``b``: after batch)."""
  nb = len(spec.batch_axes)
  x = jnp.asarray(x)
  if factor == "a":
    return x.reshape(x.shape[:nb] + (1,) * len(spec.in_axes) + x.shape[nb:])
  return x.reshape(x.shape + (1,) * len(spec.out_axes))


def effective_plain(w: LoraWeight) -> LoraWeight:
  """The same update as a plain LoRA of the same rank: ``a' = a·Λ·mask``, alpha keeps the scale."""
  spec = w.spec
  e = jnp.asarray(w.factors["e"], jnp.float32) * jnp.asarray(w.factors["rank_mask"], jnp.float32)
  a = jnp.asarray(w.a, jnp.float32) * _per_rank(spec, e, "a")
  alpha = adalora_scale(spec) * spec.rank
  return LoraWeight(w.w0, a, jnp.asarray(w.b, jnp.float32),
                    dataclasses.replace(spec, alpha=alpha, variant=Variant()))


def _adalora_init(key: jax.Array, spec: LoraSpec, w0: Any, config: Any):
  """PEFT's AdaLoRA reset: ``lora_A, lora_B ~ N(0, 0.02)`` (``lora_E = 0`` comes from the variant)."""
  ka, kb = jax.random.split(key)
  return w0, {"a": 0.02 * jax.random.normal(ka, spec.a_shape, jnp.float32),
              "b": 0.02 * jax.random.normal(kb, spec.b_shape, jnp.float32)}


register_init("adalora", _adalora_init)


def adalora_weights(params: Params) -> dict[str, LoraWeight]:
  """``{path: LoraWeight}`` of the AdaLoRA adapters of a tree (full tree or a split half)."""
  return {p: w for p, w in leaves_with_paths(params, is_leaf=is_lora_weight)
          if is_lora_weight(w) and isinstance(w.spec.variant, AdaLoRA)}


def orthogonality_penalty(params: Params) -> jax.Array:
  """AdaLoRA's regulariser: the mean over every ``P`` and ``Q`` of ``‖PPᵀ − I‖_F`` (``QᵀQ`` for Q).

  Add ``orth_reg_weight * orthogonality_penalty(adapters)`` to the loss (PEFT's
  default weight is 0.5). Each layer of a stacked kernel counts as one matrix,
  as each layer's module does in PEFT.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> cfg = jlora.LoraConfig(rank=2, targets="w", variant=jlora.AdaLoRA())
    >>> lp = jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4))}, cfg)
    >>> lp = jax.tree.map(lambda x: x, lp)  # any tree holding AdaLoRA adapters
    >>> float(jlora.variants.orthogonality_penalty(lp)) > 1.0  # near-zero factors: ‖−I‖ = √2
    True
  """
  total, count = jnp.float32(0.0), 0
  for path, w in adalora_weights(params).items():
    if w.a is None or w.b is None:
      raise ValueError(f"orthogonality_penalty: {path!r} lacks its trained factors; pass the adapters.")
    spec = w.spec
    nb = len(spec.batch_axes)
    batch = int(np.prod(spec.a_shape[:nb], dtype=np.int64))
    a = jnp.reshape(w.a, (batch, -1, spec.rank)).astype(jnp.float32)
    b = jnp.reshape(w.b, (batch, spec.rank, -1)).astype(jnp.float32)
    eye = jnp.eye(spec.rank, dtype=jnp.float32)
    for cov in (jnp.einsum("nir,nis->nrs", a, a), jnp.einsum("nro,nso->nrs", b, b)):
      total = total + jnp.sum(_safe_frobenius(cov - eye))
      count += batch
  if count == 0:
    raise ValueError("orthogonality_penalty: the tree holds no AdaLoRA adapters.")
  return total / count


def _safe_frobenius(x: jax.Array) -> jax.Array:
  """Per-matrix Frobenius norm with a zero (not NaN) gradient at 0, like torch.norm."""
  sq = jnp.sum(x * x, axis=(-2, -1))
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def rank_pattern(params: Params) -> dict[str, np.ndarray]:
  """``{path: bool array (*batch, r)}``: which ranks each AdaLoRA adapter keeps (its ``rank_mask``).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> cfg = jlora.LoraConfig(rank=3, targets="w", variant=jlora.AdaLoRA())
    >>> jlora.variants.rank_pattern(jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4))}, cfg))
    {'w': array([ True,  True,  True])}
  """
  out = {}
  for path, w in adalora_weights(params).items():
    if w.factors["rank_mask"] is None:
      raise ValueError(f"rank_pattern: {path!r} has no rank_mask (a split adapters half?); pass the full tree.")
    out[path] = np.asarray(jax.device_get(w.factors["rank_mask"])) > 0
  return out


def to_plain(w: LoraWeight) -> LoraWeight | Any:
  """A finished AdaLoRA adapter as a plain LoRA of the kept rank (its base if it kept none).

  The kept ranks come first; a stacked kernel gets the largest kept count of its
  layers, the others padded with zero columns (same update).
  """
  spec = w.spec
  keep = np.asarray(jax.device_get(w.factors["rank_mask"])) > 0  # (*batch, r)
  nb = len(spec.batch_axes)
  counts = keep.reshape(-1, spec.rank).sum(axis=1)
  k = int(counts.max()) if counts.size else 0
  if k == 0:
    return w.w0
  plain = effective_plain(w)
  # Per stacked index: the kept ranks first (stable), then the dropped ones (whose Λ is zeroed).
  order = np.argsort(~keep, axis=-1, kind="stable")[..., :k]  # (*batch, k)
  a = jnp.take_along_axis(plain.a, jnp.asarray(_per_rank(spec, order, "a")), axis=-1)
  b = jnp.take_along_axis(plain.b, jnp.asarray(_per_rank(spec, order, "b")), axis=nb)
  scale = adalora_scale(spec)
  return LoraWeight(w.w0, a, b, dataclasses.replace(plain.spec, rank=k, alpha=scale * k))
