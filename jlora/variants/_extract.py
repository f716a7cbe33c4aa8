"""``extract``: a LoRA tree from a fully fine-tuned (or merged) model by truncated SVD of ΔW."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora._config import KernelLayout, LoraConfig
from jlora._init import _check_leaf, _resolve_layout
from jlora._targets import select_targets
from jlora._tree import leaves_with_paths, path_str
from jlora._weight import LoraSpec, LoraWeight, is_lora_weight
from jlora.variants import _linalg

Params = Any
# Kernels whose smaller side exceeds this use the randomized SVD (method="auto").
RANDOMIZED_ABOVE = 2048


@dataclasses.dataclass(frozen=True)
class Extraction:
  """What ``extract`` kept per kernel: ``energy`` = ‖ΔW_r‖²_F / ‖ΔW‖²_F (1 = exact)."""

  energy: dict[str, float]
  rank: dict[str, int]
  method: dict[str, str]

  def __str__(self) -> str:
    rows = [f"{p}: rank {self.rank[p]}, energy kept {self.energy[p]:.4f} ({self.method[p]})" for p in self.energy]
    return "\n".join(rows)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _decompose(spec: LoraSpec, method: str, niter: int, key: jax.Array, base: jax.Array, tuned: jax.Array):
  """Top-``rank`` factors of ``tuned − base`` (float32) and the energies kept / total."""
  delta = _linalg.as_matrices(spec, tuned) - _linalg.as_matrices(spec, base)
  if method == "full":
    u, s, vh = jnp.linalg.svd(delta, full_matrices=False)
    u, s, vh = u[..., : spec.rank], s[..., : spec.rank], vh[..., : spec.rank, :]
  else:
    q = min(spec.rank + 8, spec.fan_in, spec.fan_out)  # a little oversampling
    keys = jax.random.split(key, delta.shape[0])
    u, s, v = jax.vmap(lambda k, m: _linalg.randomized_svd(k, m, q, niter))(keys, delta)
    u, s, vh = u[..., : spec.rank], s[..., : spec.rank], jnp.swapaxes(v, -1, -2)[..., : spec.rank, :]
  root = jnp.sqrt(s / spec.scale)
  a, b = _linalg.factors_from_torch(spec, root[..., :, None] * vh, u * root[..., None, :])
  return a, b, jnp.sum(jnp.square(s)), jnp.sum(jnp.square(delta))


def extract(base_params: Params, tuned_params: Params, *, rank: int, targets: Any, alpha: float | None = None,
            exclude: Any = (), layout: Mapping[str, KernelLayout] | None = None, method: str = "auto",
            niter: int = 4, key: jax.Array | None = None) -> tuple[Params, Extraction]:
  """A LoRA tree on ``base_params`` that approximates ``tuned_params`` (truncated SVD of ΔW).

  For each targeted kernel, ``ΔW = tuned − base`` is decomposed in float32
  (``[out, in]`` per stacked layer) and its top ``rank`` components become
  ``A = √(S_r/s)·Vᵀ_r``, ``B = U_r·√(S_r/s)`` (``s = alpha/rank``), so
  ``s·B·A`` is the best rank-r approximation of ΔW. Kernels whose smaller side
  exceeds ``RANDOMIZED_ABOVE`` use the randomized SVD (``method="auto"``).

  Args:
    base_params: the base model's parameters.
    tuned_params: the fine-tuned (or merged) parameters, same structure.
    rank: the adapter rank (an int, or per-pattern ranks via ``targets`` Rules).
    targets: which kernels, as for ``jlora.LoraConfig``.
    alpha: the adapters' alpha; default ``rank`` (scale 1).
    exclude: paths never adapted.
    layout: per-path layouts (``jlora.infer_layout``) for kernels beyond 2-D.
    method: ``"auto"``, ``"full"`` or ``"randomized"``.
    niter: subspace iterations of the randomized SVD.
    key: PRNG key for the randomized SVD (default ``jax.random.key(0)``).

  Returns:
    ``(lora_params, report)``: the LoRA tree and the energy kept per kernel.

  Raises:
    ValueError: trees that differ in structure or shapes, bad targets, bad method.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> base = {"w": jnp.zeros((6, 5))}
    >>> tuned = {"w": jnp.outer(jnp.arange(6.0), jnp.ones(5))}  # a rank-1 update
    >>> lp, report = jlora.extract(base, tuned, rank=1, targets="w")
    >>> round(report.energy["w"], 6), bool(jnp.allclose(jlora.merge(lp)["w"], tuned["w"], atol=1e-5))
    (1.0, True)
  """
  if method not in ("auto", "full", "randomized"):
    raise ValueError(f"jlora.extract: method must be 'auto', 'full' or 'randomized', got {method!r}.")
  config = LoraConfig(rank=rank, alpha=float(rank if alpha is None else alpha), targets=targets, exclude=exclude)
  tuned = dict(leaves_with_paths(tuned_params, is_leaf=is_lora_weight))
  key = jax.random.key(0) if key is None else key
  replacements: dict[str, LoraWeight] = {}
  energy, ranks, methods = {}, {}, {}
  for i, target in enumerate(select_targets(base_params, config)):
    path = target.path
    shape, _ = _check_leaf(path, target.leaf, target.rule_index)
    if path not in tuned:
      raise ValueError(f"jlora.extract: tuned_params has no {path!r}; pass the same model's parameters.")
    if tuple(jnp.shape(tuned[path])) != shape:
      raise ValueError(f"jlora.extract: {path!r} has shape {shape} in base_params but "
                       f"{tuple(jnp.shape(tuned[path]))} in tuned_params.")
    lay = _resolve_layout(target, shape, layout)
    r = target.rule.rank if target.rule.rank is not None else config.rank
    a_rule = target.rule.alpha if target.rule.alpha is not None else config.alpha
    spec = LoraSpec(shape=shape, layout=lay, rank=int(r), alpha=float(a_rule))
    if spec.rank > min(spec.fan_in, spec.fan_out):
      raise ValueError(f"jlora.extract: {path!r}: rank {spec.rank} exceeds min(fan_in, fan_out) = "
                       f"{min(spec.fan_in, spec.fan_out)}.")
    use = method
    if method == "auto":
      use = "randomized" if min(spec.fan_in, spec.fan_out) > RANDOMIZED_ABOVE else "full"
    a, b, kept, total = _decompose(spec, use, niter, jax.random.fold_in(key, i), target.leaf, tuned[path])
    energy[path] = float(kept / total) if float(total) > 0 else 1.0
    ranks[path], methods[path] = spec.rank, use
    replacements[path] = LoraWeight(target.leaf, a, b, spec)

  def replace(p, leaf):
    return replacements.get(path_str(p), leaf)

  lp = jax.tree_util.tree_map_with_path(replace, base_params, is_leaf=is_lora_weight)
  return lp, Extraction(energy, ranks, methods)

