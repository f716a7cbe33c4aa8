"""``compose``: one LoRA adapter from several, with PEFT's ``add_weighted_adapter`` methods.

Per kernel, with adapter ``i``'s factors ``A_i`` (``(*in, r_i)``), ``B_i``
(``(r_i, *out)``), scale ``s_i`` and weight ``w_i`` (only the adapters that
target the kernel take part):

* ``cat`` (exact): ``A = [w_i s_i A_i]`` and ``B = [B_i]`` concatenated along
  the rank, so ``ΔW = Σ w_i s_i A_i B_i`` at rank ``Σ r_i``.
* ``svd`` (exact, then truncated): the SVD of ``Σ w_i s_i A_i B_i``, computed
  from the factors (QR of the concatenated factors, then the SVD of a small
  ``Σr × Σr`` matrix) in float32 without forming ``ΔW``; truncated to ``rank``
  (default: the largest source rank). The fraction of ``‖ΔW‖²`` kept is
  reported per kernel (``return_info=True``).
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``
  (PEFT's semantics, all source ranks equal): the ``A``'s and the ``B``'s are
  combined *separately*, with weights ``sign(w_i s_i)·√|w_i s_i|`` on ``A`` and
  ``√|w_i s_i|`` on ``B``. Then ``ΔW = (Σ_i c_i A_i)(Σ_j d_j B_j)`` has the
  cross terms ``c_i d_j A_i B_j`` (i ≠ j) of one adapter's ``A`` with another's
  ``B``: it is *not* ``Σ w_i ΔW_i`` unless a single adapter contributes. TIES
  prunes each tensor to its top ``density`` fraction by magnitude, elects a
  sign per entry (``majority_sign="total"``: sign of the sum; ``"frequency"``:
  of the count) and averages the agreeing entries; DARE keeps each entry with
  probability ``density`` and rescales by ``1/density`` (seeded by ``seed``).
* ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``:
  the same merges applied to the full updates ``s_i A_i B_i`` (weights
  ``w_i``), then an SVD (full, or randomized with ``svd="randomized"`` for
  large kernels) truncated to ``rank``.

The result is a plain LoRA tree with, per kernel, ``alpha = rank`` (scale 1:
the scales are folded into the factors) and no rsLoRA, so its scaling is
right whatever the sources used (PEFT keeps the first source's ``use_rslora``
and overscales by ``√r``, PEFT #3449/#3761), and each kernel keeps its own rank
(PEFT drops ``rank_pattern``, so its result cannot be reloaded, #3737). With a
single adapter every method returns that adapter with ``A`` scaled by its
weight (PEFT falls back to ``linear`` there), so weight 1.0 returns it exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._tree import leaves_with_paths, path_str
from jlora._weight import LoraSpec, LoraWeight, is_lora_weight, is_node
from jlora.multi._bank import _check_layout, _plain_weights, check_same_base

Params = Any
EXACT = ("cat", "svd")
SEPARATE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSE_SVD = ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = EXACT + SEPARATE + DENSE_SVD
_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune", *DENSE_SVD}


@dataclasses.dataclass(frozen=True)
class ComposeInfo:
  """What ``compose`` did per kernel (``return_info=True``)."""

  # Fraction of ‖ΔW‖² kept by the rank truncation (SVD methods), per kernel path.
  energy_kept: dict[str, float]
  # The composed rank per kernel path.
  ranks: dict[str, int]


# -- PEFT's merges (``peft/utils/merge_utils.py``), per stacked slice ------------------------------


def _per_slice(fn, t, nb: int):
  """Applies ``fn`` to each stacked slice (leading ``nb`` axes) of ``t``."""
  for _ in range(nb):
    fn = jax.vmap(fn)
  return fn(t)


def _magnitude_prune(t, density: float, nb: int):
  """Keeps the ``int(density·numel)`` largest-magnitude entries of each stacked slice."""
  if density >= 1:
    return t

  def one(s):
    k = int(density * s.size)
    flat = s.reshape(-1)
    if k == 0:
      return jnp.zeros_like(s)
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    return (flat * jnp.zeros_like(flat).at[idx].set(1)).reshape(s.shape)

  return _per_slice(one, t, nb)


def _random_prune(t, density: float, key):
  """DARE: keep each entry with probability ``density``, rescale the kept ones by ``1/density``."""
  if density >= 1:
    return t
  keep = jax.random.bernoulli(key, density, t.shape)
  return jnp.where(keep, t, 0) / density


def _sign_mask(stacked, method: str):
  sign = jnp.sign(stacked)
  magnitude = stacked.sum(axis=0) if method == "total" else sign.sum(axis=0)
  return sign == jnp.where(magnitude >= 0, 1.0, -1.0)


def _merge(tensors: list, weights, method: str, *, density, majority_sign, nb, keys):
  """One of PEFT's task-vector merges of ``tensors`` with per-tensor ``weights``."""
  base = method.removesuffix("_svd")
  if base in ("ties", "magnitude_prune"):
    tensors = [_magnitude_prune(t, density, nb) for t in tensors]
  elif base in ("dare_linear", "dare_ties"):
    tensors = [_random_prune(t, density, k) for t, k in zip(tensors, keys)]
  stacked = jnp.stack(tensors)
  w = jnp.asarray(weights, stacked.dtype).reshape((-1,) + (1,) * (stacked.ndim - 1))
  if base in ("ties", "dare_ties"):
    mask = _sign_mask(stacked, majority_sign)
    return (stacked * w * mask).sum(axis=0) / jnp.maximum(mask.sum(axis=0), 1.0)
  return (stacked * w).sum(axis=0)


# -- SVD -----------------------------------------------------------------------------------------------


def _svd_dense(m, rank: int, *, randomized: bool, key):
  """Top-``rank`` SVD of a batch of matrices ``(..., n, k)`` -> ``(u, s, vt, total energy)``."""
  total = jnp.sum(m * m, axis=(-2, -1))
  if not randomized:
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    return u[..., :rank], s[..., :rank], vt[..., :rank, :], total
  # Halko, Martinsson & Tropp (2011): range finder with 10 extra samples and 2 power iterations.
  p = min(rank + 10, min(m.shape[-2:]))
  omega = jax.random.normal(key, (*m.shape[:-2], m.shape[-1], p), m.dtype)
  q, _ = jnp.linalg.qr(m @ omega)
  for _ in range(2):
    q, _ = jnp.linalg.qr(jnp.swapaxes(m, -1, -2) @ q)
    q, _ = jnp.linalg.qr(m @ q)
  ub, s, vt = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ m, full_matrices=False)
  return (q @ ub)[..., :rank], s[..., :rank], vt[..., :rank, :], total


def _svd_factored(a, b, rank: int):
  """Exact top-``rank`` SVD of ``a @ b`` (``(..., n, R) @ (..., R, k)``) from the factors."""
  qa, ra = jnp.linalg.qr(a)
  qb, rb = jnp.linalg.qr(jnp.swapaxes(b, -1, -2))
  u, s, vt = jnp.linalg.svd(ra @ jnp.swapaxes(rb, -1, -2), full_matrices=False)
  u, vt = qa @ u, vt @ jnp.swapaxes(qb, -1, -2)
  return u[..., :rank], s[..., :rank], vt[..., :rank, :], jnp.sum(s * s, axis=-1)


def _pad_components(u, s, vt, rank: int):
  """Zero components up to ``rank`` when the update has fewer (e.g. rank above the sum of ranks)."""
  extra = rank - s.shape[-1]
  if extra <= 0:
    return u, s, vt
  pad = lambda x, axis: jnp.pad(x, [(0, extra if i == axis % x.ndim else 0) for i in range(x.ndim)])
  return pad(u, -1), pad(s, -1), pad(vt, -2)


def _clamp(u, vt, q: float):
  """PEFT's ``svd_clamp``: clip both factors to the ``q`` quantile of their joint values."""
  hi = jnp.quantile(jnp.concatenate([u.reshape(-1), vt.reshape(-1)]), q)
  return jnp.clip(u, -hi, hi), jnp.clip(vt, -hi, hi)


# -- per kernel ----------------------------------------------------------------------------------------


def _as_matrices(w: LoraWeight, a, b):
  """``a`` (*batch, *in, r) -> (*batch, in, r) and ``b`` (*batch, r, *out) -> (*batch, r, out)."""
  nb = len(w.spec.batch_axes)
  batch = a.shape[:nb]
  return a.reshape(*batch, -1, a.shape[-1]), b.reshape(*batch, b.shape[nb], -1)


def _from_matrices(spec: LoraSpec, a, b, rank: int):
  batch = tuple(spec.shape[i] for i in spec.batch_axes)
  ins = tuple(spec.shape[i] for i in spec.in_axes)
  outs = tuple(spec.shape[i] for i in spec.out_axes)
  return a.reshape(*batch, *ins, rank), b.reshape(*batch, rank, *outs)


def _compose_kernel(path: str, present: list, method: str, *, rank, density, majority_sign, key,
                    svd: str, clamp) -> tuple[LoraWeight, float | None]:
  """``present``: ``[(LoraWeight, weight)]`` of the adapters that target ``path``."""
  ref = present[0][0]
  spec0 = ref.spec
  nb = len(spec0.batch_axes)
  dtype = jnp.result_type(*[w.a for w, _ in present], *[w.b for w, _ in present])
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  if method == "cat":
    a = jnp.concatenate([f32(w.a) * (c * w.spec.scale) for w, c in present], axis=-1)
    b = jnp.concatenate([f32(w.b) for w, _ in present], axis=nb)
    r = a.shape[-1]
    energy = None
  elif method in SEPARATE:
    ranks = sorted({w.spec.rank for w, _ in present})
    if len(ranks) > 1:
      raise ValueError(f"jlora.compose: method={method!r} combines the A's and B's entry by entry, so every "
                       f"adapter needs the same rank at {path!r}; found ranks {ranks}. Use method='cat' or 'svd'.")
    wa, wb = [], []
    for w, c in present:
      ws = c * w.spec.scale
      root = jnp.sqrt(jnp.abs(ws))
      wa.append(jnp.where(ws >= 0, root, -root))
      wb.append(root)
    keys = jax.random.split(key, 2 * len(present))
    a = _merge([f32(w.a) for w, _ in present], jnp.stack(wa), method, density=density, majority_sign=majority_sign,
               nb=nb, keys=keys[0::2])
    b = _merge([f32(w.b) for w, _ in present], jnp.stack(wb), method, density=density, majority_sign=majority_sign,
               nb=nb, keys=keys[1::2])
    r = ranks[0]
    energy = None
  else:  # SVD methods
    r = max(w.spec.rank for w, _ in present) if rank is None else int(rank)
    limit = min(spec0.fan_in, spec0.fan_out)
    if r > limit:
      raise ValueError(f"jlora.compose: rank={r} exceeds min(fan_in, fan_out) = {limit} of {path!r}.")
    if method == "svd":
      a_cat = jnp.concatenate([f32(w.a) * (c * w.spec.scale) for w, c in present], axis=-1)
      b_cat = jnp.concatenate([f32(w.b) for w, _ in present], axis=nb)
      am, bm = _as_matrices(ref, a_cat, b_cat)
      u, s, vt, total = _svd_factored(am, bm, r)
    else:
      deltas = []
      for w, _ in present:
        am, bm = _as_matrices(w, f32(w.a), f32(w.b))
        deltas.append(w.spec.scale * jnp.matmul(am, bm, precision=jax.lax.Precision.HIGHEST))
      keys = jax.random.split(key, len(present) + 1)
      m = _merge(deltas, jnp.stack([jnp.asarray(c, jnp.float32) for _, c in present]), method, density=density,
                 majority_sign=majority_sign, nb=nb, keys=keys[1:])
      u, s, vt, total = _svd_dense(m, r, randomized=svd == "randomized", key=keys[0])
    u, s, vt = _pad_components(u, s, vt, r)
    kept, total = jnp.sum(s * s), jnp.sum(total)
    energy = None if isinstance(kept, jax.core.Tracer) else (float(kept / total) if float(total) > 0 else 1.0)
    # in jlora's (in, out) layout: a = left vectors, b = S·right vectors (PEFT: B = U·S, A = Vh)
    am, bm = u, s[..., :, None] * vt
    if clamp is not None:
      am, bm = _clamp(am, bm, clamp)
    a, b = _from_matrices(spec0, am, bm, r)
  spec = dataclasses.replace(spec0, rank=int(r), alpha=float(r), rslora=False,
                             dropout=max(w.spec.dropout for w, _ in present))
  return LoraWeight(ref.w0, a.astype(dtype), b.astype(dtype), spec), energy


def compose(adapters: Sequence[Params], weights: Sequence[float] | Any, *, method: str, rank: int | None = None,
            density: float | None = None, majority_sign: str = "total", seed: int = 0, svd: str = "full",
            clamp: float | None = None, return_info: bool = False) -> Params | tuple[Params, ComposeInfo]:
  """One LoRA adapter from weighted adapters of one base (PEFT's ``add_weighted_adapter``).

  See the module docstring for the exact semantics of each method; the result
  keeps each kernel's own rank and has scale 1 (``alpha = rank``) per kernel.

  Args:
    adapters: LoRA trees on the same base.
    weights: one weight per adapter (may be negative; a JAX array is traced through
      for ``cat``/``linear``, so ``jax.grad`` can differentiate the composition).
    method: ``cat``, ``svd``, ``linear``, ``ties``, ``dare_linear``, ``dare_ties``,
      ``magnitude_prune`` or ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
      ``magnitude_prune_svd``.
    rank: the SVD methods' target rank (default: the largest source rank per kernel).
    density: fraction kept by the pruning methods (TIES/DARE/magnitude).
    majority_sign: TIES' sign election, ``"total"`` or ``"frequency"``.
    seed: DARE's random masks and the randomized SVD.
    svd: ``"full"`` or ``"randomized"`` (the dense ``*_svd`` methods on large kernels;
      ``svd`` itself is always exact, from the factors).
    clamp: PEFT's ``svd_clamp``: clip the SVD factors to this quantile of their values.
    return_info: also return a ``ComposeInfo`` (energy kept and rank per kernel).

  Returns:
    A plain LoRA tree on the base (and the ``ComposeInfo`` if asked).

  Raises:
    ValueError: adapters on different bases, a non-plain adapter (DoRA, a bank),
      unequal ranks for a method that needs equal ranks, bad options.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> p = {"w": jnp.ones((8, 8))}
    >>> a = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=2, targets="w"))
    >>> b = jlora.init(jax.random.key(1), p, jlora.LoraConfig(rank=4, targets="w", rslora=True))
    >>> jlora.compose([a, b], [0.7, 0.3], method="cat")["w"].spec.rank
    6
  """
  adapters = list(adapters)
  if not adapters:
    raise ValueError("jlora.compose: give at least one adapter tree.")
  if method not in METHODS:
    raise ValueError(f"jlora.compose: method must be one of {METHODS}, got {method!r}.")
  if isinstance(weights, (jax.Array, np.ndarray)):
    if weights.shape != (len(adapters),):
      raise ValueError(f"jlora.compose: weights has shape {weights.shape}; expected ({len(adapters)},), "
                       "one per adapter.")
    weight_list = [weights[i] for i in range(len(adapters))]
  else:
    weight_list = list(weights)
    if len(weight_list) != len(adapters):
      raise ValueError(f"jlora.compose: {len(weight_list)} weights for {len(adapters)} adapters; give one per adapter.")
  if method in _DENSITY:
    if density is None or isinstance(density, bool) or not 0.0 <= float(density) <= 1.0:
      raise ValueError(f"jlora.compose: method={method!r} needs density= in [0, 1] (the fraction of entries kept), "
                       f"got {density!r}.")
  elif density is not None:
    raise ValueError(f"jlora.compose: density= is only used by {sorted(_DENSITY)}, not {method!r}.")
  if majority_sign not in ("total", "frequency"):
    raise ValueError(f"jlora.compose: majority_sign must be 'total' or 'frequency', got {majority_sign!r}.")
  is_svd = method == "svd" or method in DENSE_SVD
  if rank is not None and (not is_svd or isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1):
    raise ValueError(f"jlora.compose: rank= is a positive integer for the SVD methods only (method={method!r}, "
                     f"rank={rank!r}).")
  if svd not in ("full", "randomized"):
    raise ValueError(f"jlora.compose: svd must be 'full' or 'randomized', got {svd!r}.")
  if clamp is not None and (not is_svd or not 0.0 < float(clamp) <= 1.0):
    raise ValueError(f"jlora.compose: clamp= is a quantile in (0, 1] for the SVD methods only, got {clamp!r}.")
  names = [f"adapters[{i}]" for i in range(len(adapters))]
  weights_by = [_plain_weights(t, f"jlora.compose: {n}") for t, n in zip(adapters, names)]
  check_same_base(adapters, names, where="jlora.compose")

  paths = [p for p, _ in leaves_with_paths(adapters[0], is_leaf=is_node)]
  out: dict[str, LoraWeight] = {}
  energy: dict[str, float] = {}
  root = jax.random.key(seed)
  for index, path in enumerate(paths):
    present = [(ws[path], weight_list[i]) for i, ws in enumerate(weights_by) if path in ws]
    if not present:
      continue
    for (w, _), i in zip(present, [i for i, ws in enumerate(weights_by) if path in ws]):
      _check_layout(path, w, present[0][0], names[i], "jlora.compose")
    if len(adapters) == 1:  # PEFT falls back to `linear` for one adapter; this is its exact form
      w, c = present[0]
      a = w.a if isinstance(c, (int, float)) and c == 1 else (jnp.asarray(w.a, jnp.float32) * c).astype(w.a.dtype)
      out[path] = w.replace(a=a)
      continue
    out[path], e = _compose_kernel(path, present, method, rank=rank, density=density, majority_sign=majority_sign,
                                   key=jax.random.fold_in(root, index), svd=svd, clamp=clamp)
    if e is not None:
      energy[path] = e

  def replace(p, leaf):
    s = path_str(p)
    if s in out:
      return out[s]
    return leaf.w0 if is_lora_weight(leaf) else leaf

  result = jax.tree_util.tree_map_with_path(replace, adapters[0], is_leaf=is_node)
  if return_info:
    return result, ComposeInfo(energy_kept=energy, ranks={p: w.spec.rank for p, w in out.items()})
  return result

