"""PiSSA and OLoRA initialisation: A and B from the kernel's top components, the base replaced by
the residual, and the initial factors kept so the adapter can be exported onto the original base.

``LoraConfig(init="pissa" | "pissa_niter_K" | "olora")``:

* ``pissa`` (Meng et al. 2024; PEFT ``pissa_init``): ``W = V·S·Uᵀ`` (SVD of the
  ``[out, in]`` kernel in float32), ``A = diag(√(S_r/s))·Uᵀ_r``,
  ``B = V_r·diag(√(S_r/s))``; ``pissa_niter_K`` uses the randomized SVD of
  ``torch.svd_lowrank(W, r, niter=K)``.
* ``olora`` (Büyükakyüz 2024; PEFT ``olora_init``): ``W = Q·R``, ``A = R[:r]``,
  ``B = Q[:, :r]``.

Both set ``W_res = W − s·B·A`` (float32, cast to the base dtype at the end) and
the adapter's variant becomes ``Residual(inner=<configured variant>)``, which
keeps the initial factors as the frozen children ``a0``/``b0``. Training sees
``W_res + s·BA`` (= W at step 0). ``jlora.variants.to_lora`` and
``jlora.peft.save`` turn the trained adapter into a plain LoRA on the *original*
base with PEFT's ``subtract_mutated_init`` construction: rank 2r,
``A' = [A | A0]``, ``B' = [B | −B0]``, alpha ×2 (×√2 with rsLoRA), so PyTorch
PEFT loads it onto the unmodified model. A jlora checkpoint of a Residual
adapter belongs to the residual base (its fingerprint); convert it first to
load it onto the original model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora._init_methods import register_init
from jlora._lazy import dense, is_lazy_node
from jlora._variant import PLAIN, AxisSpec, Variant, lowrank_delta
from jlora._weight import LoraSpec, LoraWeight
from jlora.variants import _linalg

HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Residual(Variant):
  """An adapter on a residual base ``W − s·B0·A0`` (PiSSA, OLoRA) that keeps ``a0``, ``b0``.

  Created by ``jlora.init`` for ``init="pissa"``, ``"pissa_niter_K"`` or
  ``"olora"``, wrapping the configured variant (plain LoRA or DoRA), to which
  it defers for everything but its two frozen children.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> lp = jlora.init(jax.random.key(0), {"w": jnp.eye(4)}, jlora.LoraConfig(rank=2, targets="w", init="pissa"))
    >>> lp["w"].spec.variant, sorted(lp["w"].factors)
    (Residual(inner=Variant()), ['a', 'a0', 'b', 'b0'])
  """

  name = "residual"
  inner: Variant = PLAIN

  def __post_init__(self):
    inner = self.inner
    if isinstance(inner, Mapping):
      inner = Variant.from_json(inner)
      object.__setattr__(self, "inner", inner)
    if not isinstance(inner, Variant) or isinstance(inner, Residual) or inner.name == "adalora":
      raise ValueError(f"PiSSA/OLoRA initialisation works with plain LoRA and DoRA adapters, not {inner!r} "
                       "(PEFT rejects it for AdaLoRA too).")

  def factor_axes(self, spec: LoraSpec) -> dict[str, AxisSpec]:
    inner = self.inner.factor_axes(spec)
    return {**inner, "a0": inner["a"], "b0": inner["b"]}

  def special_sizes(self, spec: LoraSpec) -> dict[str, int]:
    return self.inner.special_sizes(spec)

  def trainable(self, name: str) -> bool:
    return name not in ("a0", "b0") and self.inner.trainable(name)

  def init_extras(self, spec: LoraSpec, w0: Any, factors: Mapping[str, Any]) -> dict[str, Any]:
    return {**self.inner.init_extras(spec, w0, factors), "a0": factors["a"], "b0": factors["b"]}

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, "inner": self.inner.to_json()}

  def describe(self) -> str:
    return f"residual({self.inner.describe() or 'lora'})"

  def dot(self, ctx, v, x, base_out, plan):
    return self.inner.dot(ctx, v, x, base_out, plan)

  def conv(self, ctx, v, x, base_out, params):
    return self.inner.conv(ctx, v, x, base_out, params)

  def gather(self, ctx, v, indices, base_out, params):
    return self.inner.gather(ctx, v, indices, base_out, params)

  def ragged_dot(self, ctx, v, x, group_sizes, base_out, plan):
    return self.inner.ragged_dot(ctx, v, x, group_sizes, base_out, plan)

  def scale_kernel(self, v, c, base):
    return self.inner.scale_kernel(v, c, base)

  def delta(self, w: LoraWeight, dtype: Any) -> Any:
    return self.inner.delta(w, dtype)

  def merged(self, w: LoraWeight, w0: Any) -> Any:
    return self.inner.merged(w, w0)


def to_plain(w: LoraWeight, base: Any = None) -> LoraWeight:
  """A Residual adapter as an adapter of the inner variant on the original base, rank 2r.

  ``base`` is the original kernel; without it, ``w0 + s·B0·A0`` (float32, cast
  to the base dtype) stands in for it.
  """
  spec = w.spec
  inner = spec.variant.inner
  nb = len(spec.batch_axes)
  f = w.factors
  a = jnp.concatenate([jnp.asarray(f["a"]), jnp.asarray(f["a0"])], axis=-1)
  b = jnp.concatenate([jnp.asarray(f["b"]), -jnp.asarray(f["b0"])], axis=nb)
  alpha = spec.alpha * (math.sqrt(2.0) if spec.rslora else 2.0)
  new_spec = dataclasses.replace(spec, rank=2 * spec.rank, alpha=alpha, variant=inner)
  if base is None:
    w0 = dense(w.w0)
    init = LoraWeight(w0, f["a0"], f["b0"], dataclasses.replace(spec, variant=PLAIN))
    base = (w0.astype(jnp.float32) + lowrank_delta(init)).astype(w0.dtype)
  extras = {n: v for n, v in f.items() if n not in ("a", "b", "a0", "b0")}
  return LoraWeight(base, a, b, new_spec, extras)


# -- the init methods --------------------------------------------------------------------------


def _check_float(w0: Any, method: str) -> None:
  if is_lazy_node(w0):
    raise ValueError(f"init={method!r} needs the kernel in floating point (it replaces it by the residual "
                     "W − s·BA); initialise on the float base and quantize the residual afterwards.")


def _finish(spec: LoraSpec, w0: Any, mats: jax.Array, a_t: jax.Array, b_t: jax.Array):
  """Residual ``W − s·B·A`` in float32 (cast at the end) and jlora-oriented factors."""
  res = mats - spec.scale * jnp.matmul(b_t, a_t, precision=HI)
  w_res = _linalg.from_matrices(spec, res).astype(jnp.asarray(w0).dtype)
  a, b = _linalg.factors_from_torch(spec, a_t, b_t)
  return w_res, {"a": a, "b": b}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _pissa(spec: LoraSpec, method: str, niter: int, key: jax.Array, w0: jax.Array):
  mats = _linalg.as_matrices(spec, w0)
  r = spec.rank
  if method == "randomized":
    keys = jax.random.split(key, mats.shape[0])
    v, s, u = jax.vmap(lambda k, x: _linalg.randomized_svd(k, x, r, niter))(keys, mats)
    uh = jnp.swapaxes(u, -1, -2)
  else:
    v, s, uh = jnp.linalg.svd(mats, full_matrices=False)
    v, s, uh = v[..., :r], s[..., :r], uh[..., :r, :]
  root = jnp.sqrt(s / spec.scale)
  a_t = root[..., :, None] * uh  # diag(√(S_r/s))·Uhᵀ_r: (batch, r, in)
  b_t = v * root[..., None, :]  # V_r·diag(√(S_r/s)): (batch, out, r)
  return _finish(spec, w0, mats, a_t, b_t)


@functools.partial(jax.jit, static_argnums=(0,))
def _olora(spec: LoraSpec, w0: jax.Array):
  mats = _linalg.as_matrices(spec, w0)
  q, r_mat = jnp.linalg.qr(mats)
  return _finish(spec, w0, mats, r_mat[..., : spec.rank, :], q[..., :, : spec.rank])


def _pissa_init(key: jax.Array, spec: LoraSpec, w0: Any, config: Any):
  _check_float(w0, config.init)
  m = re.fullmatch(r"pissa_niter_(\d+)", config.init)
  return _pissa(spec, "randomized" if m else "full", int(m.group(1)) if m else 0, key, w0)


def _olora_init(key: jax.Array, spec: LoraSpec, w0: Any, config: Any):
  del key
  _check_float(w0, "olora")
  return _olora(spec, w0)


def _wrap(variant: Variant) -> Variant:
  return Residual(inner=variant)


register_init("pissa", _pissa_init, variant=_wrap)
register_init(r"pissa_niter_\d+", _pissa_init, shown="pissa_niter_K", variant=_wrap)
register_init("olora", _olora_init, variant=_wrap)
