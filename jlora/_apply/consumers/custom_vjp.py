"""What a train step saves and recomputes: the low-rank term under custom VJPs.

Under the *custom-VJP lowering* (``ctx.custom_vjp``, the CPU default) a matmul's
low-rank term runs under one custom VJP (``lowrank_term``) that saves only what
the backward pass cannot get otherwise: the layer input is rebuilt from values
the model's own backward pass keeps anyway when it can be
(``jlora._apply.recompute``) and a dropout mask is drawn again from its key.
Adapted layers that read one input (q/k/v, gate/up) are served as one group
(``grouped_dot_out``): one ``x·[A_1 … A_n]`` matmul, one rebuild of the input.
The layer output ``base + term`` is materialised once (``add_term``). Together
these bring a LoRA step's FLOPs and memory to within a few percent of the
backward pass that computes no weight gradient at all (see
``benchmarks/train_step.py`` and docs/design.md).

XLA:CPU removes optimization barriers before scheduling and may run a
recomputation early, so each recomputation is tied to the backward pass by a
data dependency on the incoming cotangent (``_after``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora._apply.consumers.contraction import (cast, contract, contract_two_step, expand, first,
                                                lowrank_labels, scaled, transpose)
from jlora._apply.consumers.plans import DotPlan
from jlora._apply.context import ConsumerContext, fused_for
from jlora._apply.lowrank import RANK, LowRank
from jlora._apply.recompute import Recompute
from jlora._variant import Variant

# -- one layer's term ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _Term:
  """Static parts of one low-rank term under the custom VJP (see ``lowrank_term``)."""

  labels: tuple
  scale: Any
  precision: Any
  fused: bool
  rate: float  # LoRA dropout rate (0: none)
  dtype: Any  # the factors' dtype: the input is cast to it
  rebuild: Any  # Callable[[roots], x] or None: x is saved instead
  out_dtype: Any = None  # the term is cast to it (None: the factors' dtype)


def _keep_mask(st: _Term, key_data, shape, dep=None):
  key = jax.random.wrap_key_data(key_data)
  p = 1.0 - st.rate
  return jax.random.bernoulli(key, p if dep is None else p + dep, shape)


def _after(dt):
  """A zero that depends on ``dt``: adding it to a value makes XLA compute that value late.

  XLA:CPU removes optimization barriers before scheduling, and its scheduler may then
  run a recomputation in the forward pass, which would keep its result alive as if it
  were saved. A data dependency on the backward pass's ``dt`` cannot be removed
  (``0·v`` is not folded for floats).
  """
  return lax.mul(cast(first(dt), jnp.float32), np.float32(0.0))


def _plus(x, z):
  return lax.add(x, cast(z, x.dtype)) if jnp.issubdtype(x.dtype, jnp.floating) else x


def _prep(st: _Term, x, keep):
  if keep is not None:
    x = jnp.where(keep, x / (1.0 - st.rate), jnp.zeros_like(x))
  return cast(x, st.dtype)


def _late_input(rebuild, saved, key_data, dt):
  """The layer input in the backward pass: ``saved`` itself, or rebuilt from the saved roots.

  Returns ``(x, key_data, dt, dep)``; ``dep`` (or ``None``) is a zero that depends on ``dt``.
  """
  dep = None
  if rebuild is not None or key_data is not None:
    # Tie the recomputation to the backward pass so that XLA neither merges it with the
    # forward computation (which would keep the input alive) nor schedules it early.
    saved, key_data, dt = lax.optimization_barrier((saved, key_data, dt))
    dep = _after(dt)
  if rebuild is None:
    return saved, key_data, dt, dep
  # One late operand is enough to order the whole recomputation (the smallest float one,
  # so that no large copy is made when it does not fuse).
  floats = [i for i, r in enumerate(saved) if jnp.issubdtype(r.dtype, jnp.floating)]
  late = min(floats, key=lambda i: saved[i].size) if floats else None
  x = rebuild(tuple(_plus(r, dep) if i == late else r for i, r in enumerate(saved)))
  return x, key_data, dt, dep


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _term(st: _Term, x, roots, f1, f2, key_data):
  return _term_fwd(st, x, roots, f1, f2, key_data)[0]


def _term_fwd(st: _Term, x, roots, f1, f2, key_data):
  keep = None if key_data is None else _keep_mask(st, key_data, x.shape)
  y, t = contract_two_step(_prep(st, x, keep), f1, f2, scale=st.scale, labels=st.labels,
                       precision=st.precision, fused=st.fused)
  if st.out_dtype is not None:
    y = cast(y, st.out_dtype)
  # The input is saved only when it cannot be rebuilt from values kept anyway; a dropout
  # mask is never saved (it is drawn again from its key).
  saved = roots if st.rebuild is not None else x
  return y, (saved, f1, f2, t, key_data, jnp.zeros((0,), x.dtype))


def _term_bwd(st: _Term, res, dy):
  saved, f1, f2, t, key_data, x_dtype = res
  xl, l1, l2, tl, ol = st.labels
  dy = cast(dy, f2.dtype)
  dt = contract(dy, ol, f2, l2, tl, precision=st.precision)
  df2 = contract(t, tl, dy, ol, l2, precision=st.precision)
  dt = scaled(dt, st.scale)
  x, key_data, dt, dep = _late_input(st.rebuild, saved, key_data, dt)
  keep = None if key_data is None else _keep_mask(st, key_data, x.shape, dep)
  df1 = contract(_prep(st, x, keep), xl, dt, tl, l1, precision=st.precision)
  dx = expand(dt, tl, f1, l1, xl, st.fused, st.precision)
  if keep is not None:
    dx = jnp.where(keep, dx / (1.0 - st.rate), jnp.zeros_like(dx))
  return cast(dx, x_dtype.dtype), None, df1, df2, None


_term.defvjp(_term_fwd, _term_bwd)


def lowrank_term(x, f1, f2, *, labels, scale, precision, fused: bool, rate: float = 0.0, key=None,
                 recompute: Recompute | None = None, out_dtype=None):
  """``scale · ((dropout(x)·f1)·f2)`` under a custom VJP that controls what is saved.

  The backward pass keeps ``t = x·f1`` and either ``x`` or, with ``recompute``,
  the roots ``x`` is rebuilt from (values the model's own backward pass keeps
  anyway); a dropout mask is redrawn from ``key`` instead of being saved. With
  ``fused`` the rank expansions are fused multiply-adds (see ``plain.two_step``).

  The term is cast to ``out_dtype`` if given (inside the custom VJP: under
  ``jax.grad`` nothing of the term is linearised op by op while tracing).
  """
  key_data = None if key is None or rate <= 0.0 else jax.random.key_data(key)
  st = _Term(labels=labels, scale=scale, precision=precision, fused=fused, rate=float(rate),
             dtype=f1.dtype, rebuild=None if recompute is None else recompute.rebuild,
             out_dtype=out_dtype)
  roots = () if recompute is None else tuple(recompute.roots)
  return _term(st, x, roots, f1, f2, key_data)


# -- adapted layers that share their input ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Member:
  """One layer of a group: its own labels and scaling (see ``_Group``)."""

  l2: tuple  # labels of its second factor
  out: tuple  # labels of its output
  t: tuple  # labels of its slice of ``t``: the group's ``t`` labels, renamed for this layer
  rank: int
  scale: Any
  out_dtype: Any
  fused: bool


@dataclasses.dataclass(frozen=True, eq=False)
class _Group:
  """Static parts of adapted layers that read one input, under one custom VJP (``grouped_dot_out``)."""

  x: tuple  # labels of the input (the first layer's)
  a: tuple  # labels of the concatenated first factors (the first layer's)
  t: tuple  # labels of ``t = x·A_cat``
  a_rank: int  # the rank axis of A_cat
  t_rank: int  # the rank axis of t
  perms: tuple  # per layer: the transpose of its first factor into the order of ``a``
  members: tuple  # per layer: a ``_Member``
  precision: Any
  dtype: Any
  rebuild: Any
  fused: bool  # fused expansion for ``dx = dt·A_catᵀ``

  @property
  def ranks(self) -> list[int]:
    return [m.rank for m in self.members]


def _cat_a(st: _Group, f1s):
  return lax.concatenate([transpose(f, p) for f, p in zip(f1s, st.perms)], st.a_rank)


def _split(x, axis: int, sizes):
  out, off = [], 0
  for r in sizes:
    out.append(lax.slice_in_dim(x, off, off + r, axis=axis))
    off += r
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _group(st: _Group, x, roots, f1s, f2s):
  return _group_fwd(st, x, roots, f1s, f2s)[0]


def _group_fwd(st: _Group, x, roots, f1s, f2s):
  t_all = contract(cast(x, st.dtype), st.x, _cat_a(st, f1s), st.a, st.t, precision=st.precision)
  ys, ts = [], []
  for f2, m, t in zip(f2s, st.members, _split(t_all, st.t_rank, st.ranks)):
    t = scaled(t, m.scale)
    ys.append(cast(expand(t, m.t, f2, m.l2, m.out, m.fused, st.precision), m.out_dtype))
    ts.append(t)
  saved = roots if st.rebuild is not None else x
  return tuple(ys), (saved, f1s, f2s, tuple(ts), jnp.zeros((0,), x.dtype))


def _group_bwd(st: _Group, res, dys):
  saved, f1s, f2s, ts, x_dtype = res
  dts, df2s = [], []
  for dy, f2, m, t in zip(dys, f2s, st.members, ts):
    dy = cast(dy, f2.dtype)
    dts.append(scaled(contract(dy, m.out, f2, m.l2, m.t, precision=st.precision), m.scale))
    df2s.append(contract(t, m.t, dy, m.out, m.l2, precision=st.precision))
  dt = lax.concatenate(dts, st.t_rank)
  x, _, dt, _ = _late_input(st.rebuild, saved, None, dt)
  df1 = contract(cast(x, st.dtype), st.x, dt, st.t, st.a, precision=st.precision)
  df1s = [transpose(d, [list(p).index(i) for i in range(d.ndim)])  # each back to its own axis order
          for d, p in zip(_split(df1, st.a_rank, st.ranks), st.perms)]
  dx = expand(dt, st.t, _cat_a(st, f1s), st.a, st.x, st.fused, st.precision)
  return cast(dx, x_dtype.dtype), None, tuple(df1s), tuple(df2s)


_group.defvjp(_group_fwd, _group_bwd)


def groupable(v: LowRank, plan: DotPlan) -> bool:
  """Whether the layer may join a group (``grouped_dot_out``): a plain LoRA matmul whose input
  meets ``A`` first over input axes only."""
  if not v.has_factors or plan.first != "a" or v.source.spec.dropout > 0.0:
    return False
  if type(v.source.spec.variant).dot is not Variant.dot:  # a variant with a matmul of its own
    return False
  a = list(v.a_labels)
  return a.count(RANK) == 1 and all(l is RANK or l in plan.x_labels for l in a)


def grouped_dot_out(ctx: ConsumerContext, vs, x, base_outs, plans, *,
                    recompute: Recompute | None = None) -> list | None:
  """The outputs of several adapted matmuls that read the same input ``x``, as one custom VJP.

  ``t = x·[A_1 … A_n]`` is one matmul, and so are ``dA`` and the input's gradient
  ``dt·[A_1 … A_n]ᵀ`` in the backward pass, which rebuilds ``x`` (or keeps it) once
  for all the layers instead of once per layer (q/k/v, gate/up). Each layer then
  expands its own slice of ``t`` with its ``B`` and adds its base output
  (``add_term``), as ``Variant.dot`` does for one layer. Returns ``None`` when the layers do not line up (factors of
  different dtypes or layouts): each is then served alone.
  """
  p0, v0 = plans[0], vs[0]
  pos0 = {l: i for i, l in enumerate(p0.x_labels)}
  a_pos = [("r" if l is RANK else pos0[l]) for l in v0.a_labels]
  perms, members = [], []
  for v, plan in zip(vs, plans):
    if v.a.dtype != v0.a.dtype or plan.precision != p0.precision or len(plan.x_labels) != len(p0.x_labels):
      return None
    pos = {l: i for i, l in enumerate(plan.x_labels)}
    mine = [("r" if l is RANK else pos[l]) for l in v.a_labels]
    if sorted(mine, key=str) != sorted(a_pos, key=str):
      return None
    perms.append(tuple(mine.index(p) for p in a_pos))
    members.append((v, plan))
  xl, a_l, _, tl, _ = lowrank_labels(p0.x_labels, v0.a_labels, v0.b_labels, p0.out_labels)
  rename_base = {l: i for i, l in enumerate(p0.x_labels)}
  ms = []
  for v, plan in members:
    labels = lowrank_labels(plan.x_labels, v.a_labels, v.b_labels, plan.out_labels)
    rename = {l: (RANK if l is RANK else plan.x_labels[rename_base[l]]) for l in tl}
    if labels[3] != tuple(rename[l] for l in tl):
      return None
    spec = v.source.spec
    ms.append(_Member(l2=labels[2], out=labels[4], t=labels[3], rank=spec.rank, scale=spec.scale,
                      out_dtype=plan.out_dtype,
                      fused=fused_for(ctx, spec.rank)))
  total = sum(m.rank for m in ms)
  st = _Group(x=xl, a=a_l, t=tl, a_rank=a_l.index(RANK), t_rank=tl.index(RANK), perms=tuple(perms),
              members=tuple(ms), precision=p0.precision, dtype=v0.a.dtype,
              rebuild=None if recompute is None else recompute.rebuild,
              fused=fused_for(ctx, total))
  roots = () if recompute is None else tuple(recompute.roots)
  for _ in vs:
    ctx.next_key()  # one dropout site per layer, as when each is served alone
  terms = _group(st, x, roots, tuple(v.a for v in vs), tuple(v.b for v in vs))
  return [add_term(ctx, v, base, term) for v, base, term in zip(vs, base_outs, terms)]


# -- the layer output: base + term, materialised once ---------------------------------------


def add_term(ctx: ConsumerContext, v: LowRank, base_out, term):
  """The layer output ``base_out + term``, materialised once under the custom-VJP lowering.

  XLA:CPU fuses a cheap elementwise producer into every consumer that reads it,
  so the sum would be recomputed by each of them, forward and backward, keeping
  both the base output and the term alive. Dividing the sum by a runtime one
  (exact) makes it an "expensive" producer that XLA computes once, into a
  buffer that takes the base output's place.
  """
  term = cast(term, base_out.dtype)
  if (not ctx.custom_vjp or base_out.shape != term.shape
      or not jnp.issubdtype(base_out.dtype, jnp.floating)):
    return base_out + term
  return _materialized_sum(base_out, term, _runtime_one(next(iter(v.factors.values()))))


@jax.custom_vjp
def _materialized_sum(base, term, one):
  """``(base + term) / one`` (see ``add_term``), under a custom VJP so that tracing it under
  ``jax.grad`` costs no linearisation."""
  return lax.div(lax.add(base, term), cast(one, base.dtype))


def _materialized_sum_fwd(base, term, one):
  return _materialized_sum(base, term, one), one


def _materialized_sum_bwd(one, g):
  # The cotangent is divided by the same runtime one, i.e. materialised once too: it is a sum
  # of several (a residual stream's), which XLA would otherwise fuse into both consumers (the
  # base matmul's transpose and the low-rank term's), keeping the summands alive longer
  # (temp memory 1.23× the floor instead of 1.05× in benchmarks/train_step.py --quick).
  g = lax.div(g, cast(one, g.dtype))
  return g, g, jnp.zeros_like(one)


_materialized_sum.defvjp(_materialized_sum_fwd, _materialized_sum_bwd)


def _runtime_one(f):
  """``1.0`` computed from a small, always live factor, so that XLA cannot fold it away."""
  zero = lax.mul(cast(first(lax.stop_gradient(f)), jnp.float32), np.float32(0.0))
  return lax.add(zero, np.float32(1.0))
