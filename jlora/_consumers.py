"""The low-rank path where a LoRA kernel is consumed: matmul, convolution, lookup.

Each function returns the *scaled low-rank term* to add to the base result,
computed from the layer input and the factors only (``x·A`` first, then
``·B``); the dense ``W0 + scale·B·A`` is never formed.

Under the *custom-VJP lowering* (``ctx.custom_vjp``, the CPU default) a matmul's
low-rank term runs under one custom VJP (``lowrank_term``) that saves only what
the backward pass cannot get otherwise: the layer input is rebuilt from values
the model's own backward pass keeps anyway when it can be (``jlora._recompute``)
and a dropout mask is drawn again from its key; the layer output
``base + term`` is materialised once (``add_term``). Together these bring a
LoRA step's FLOPs and memory to within a few percent of the backward pass that
computes no weight gradient at all (see ``benchmarks/train_step.py`` and
docs/design.md). The rank-``r`` expansions ``t·B`` / ``dt·Aᵀ`` are skinny
matmuls, or, with ``ctx.fused_expansion``, ``r`` fused multiply-adds.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora._lowrank import RANK, Label, Letters, LowRank, Unsupported, new_label, prov
from jlora._recompute import Recompute

# Ranks up to this use the fused expansion when it is enabled.
FUSED_EXPANSION_MAX_RANK = 16


class OrientationError(Exception):
  pass


def _dropout(x, rate: float, key):
  if key is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _orientation(v: LowRank, contracted: frozenset, what: str) -> str:
  """Which factor the layer input meets first; raises if the use is transposed."""
  c = frozenset(l for l in contracted if l.axes)
  a_only = frozenset(l for l in v.a_only if l.axes)
  b_only = frozenset(l for l in v.b_only if l.axes)
  if c and c == a_only:
    return "a"
  spec = v.source.spec
  if c and c == b_only and spec.layout.embedding:
    return "b"
  got = tuple(sorted(prov(c)))
  raise OrientationError(
      f"{v.path!r} is {what} over kernel axes {got}, but its adapter was created with input "
      f"axes {spec.in_axes} (A covers the input axes, B the output axes {spec.out_axes}). The "
      "layer uses this kernel in another orientation (e.g. stored transposed like GPT-2's "
      "Conv1D). Re-create the adapters with jlora.init(..., layout=jlora.infer_layout(apply_fn, "
      "params, *example_args)) or give the rule layout=jlora.KernelLayout(in_axes=...)."
  )


# -- the two-step contraction ------------------------------------------------------------


def contract(a, a_labels, b, b_labels, out_labels, *, precision=None):
  """``einsum(a, b -> out)`` over labels, as one ``lax.dot_general`` and a transpose.

  Cheaper to trace than ``jnp.einsum`` (no contraction-path search, no nested jit),
  which matters when a model has hundreds of adapted layers.
  """
  la, lb, lo = list(a_labels), list(b_labels), list(out_labels)
  simple = (len(set(la)) == len(la) and len(set(lb)) == len(lb) and len(set(lo)) == len(lo)
            and all(l in lb or l in lo for l in la) and all(l in la or l in lo for l in lb)
            and all(l in la or l in lb for l in lo) and a.dtype == b.dtype)
  if not simple:
    L = Letters()
    return jnp.einsum(f"{L(la)},{L(lb)}->{L(lo)}", a, b, precision=precision)
  batch = [l for l in la if l in lb and l in lo]
  summed = [l for l in la if l in lb and l not in lo]
  dn = (([la.index(l) for l in summed], [lb.index(l) for l in summed]),
        ([la.index(l) for l in batch], [lb.index(l) for l in batch]))
  out = lax.dot_general(a, b, dn, precision=precision)
  got = batch + [l for l in la if l not in lb] + [l for l in lb if l not in la]
  return _transpose(out, [got.index(l) for l in lo])


def _expand(t, t_labels, f, f_labels, out_labels, fused: bool, precision=None):
  """``einsum(t, f -> out)`` where only the rank label is contracted."""
  if not fused:
    return contract(t, t_labels, f, f_labels, out_labels, precision=precision)
  r_t, r_f = t_labels.index(RANK), f_labels.index(RANK)
  tl = [l for l in t_labels if l != RANK]
  fl = [l for l in f_labels if l != RANK]
  acc = None
  for k in range(t.shape[r_t]):
    term = contract(lax.index_in_dim(t, k, r_t, keepdims=False), tl,
                    lax.index_in_dim(f, k, r_f, keepdims=False), fl, out_labels)
    acc = term if acc is None else acc + term
  return acc


def _lowrank_term(x, f1, f2, *, scale, labels, precision, fused):
  """``scale · einsum(einsum(x, f1), f2)`` with labels ``(x, f1, f2, t, out)``."""
  xl, l1, l2, tl, ol = labels
  t = contract(x, xl, f1, l1, tl, precision=precision)
  t = _scaled(t, scale)
  return _expand(t, tl, f2, l2, ol, fused, precision), t


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
  return lax.mul(_cast(_first(dt), jnp.float32), np.float32(0.0))


def _plus(x, z):
  return lax.add(x, _cast(z, x.dtype)) if jnp.issubdtype(x.dtype, jnp.floating) else x


def _prep(st: _Term, x, keep):
  if keep is not None:
    x = jnp.where(keep, x / (1.0 - st.rate), jnp.zeros_like(x))
  return _cast(x, st.dtype)


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
  y, t = _lowrank_term(_prep(st, x, keep), f1, f2, scale=st.scale, labels=st.labels,
                       precision=st.precision, fused=st.fused)
  if st.out_dtype is not None:
    y = _cast(y, st.out_dtype)
  # The input is saved only when it cannot be rebuilt from values kept anyway; a dropout
  # mask is never saved (it is drawn again from its key).
  saved = roots if st.rebuild is not None else x
  return y, (saved, f1, f2, t, key_data, jnp.zeros((0,), x.dtype))


def _term_bwd(st: _Term, res, dy):
  saved, f1, f2, t, key_data, x_dtype = res
  xl, l1, l2, tl, ol = st.labels
  dy = _cast(dy, f2.dtype)
  dt = contract(dy, ol, f2, l2, tl, precision=st.precision)
  df2 = contract(t, tl, dy, ol, l2, precision=st.precision)
  dt = _scaled(dt, st.scale)
  x, key_data, dt, dep = _late_input(st.rebuild, saved, key_data, dt)
  keep = None if key_data is None else _keep_mask(st, key_data, x.shape, dep)
  df1 = contract(_prep(st, x, keep), xl, dt, tl, l1, precision=st.precision)
  dx = _expand(dt, tl, f1, l1, xl, st.fused, st.precision)
  if keep is not None:
    dx = jnp.where(keep, dx / (1.0 - st.rate), jnp.zeros_like(dx))
  return _cast(dx, x_dtype.dtype), None, df1, df2, None


_term.defvjp(_term_fwd, _term_bwd)


def lowrank_term(x, f1, f2, *, labels, scale, precision, fused: bool, rate: float = 0.0, key=None,
                 recompute: Recompute | None = None, out_dtype=None):
  """``scale · ((dropout(x)·f1)·f2)`` under a custom VJP that controls what is saved.

  The backward pass keeps ``t = x·f1`` and either ``x`` or, with ``recompute``,
  the roots ``x`` is rebuilt from (values the model's own backward pass keeps
  anyway); a dropout mask is redrawn from ``key`` instead of being saved. With
  ``fused`` the rank expansions are fused multiply-adds (see ``two_step``).

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
  return lax.concatenate([_transpose(f, p) for f, p in zip(f1s, st.perms)], st.a_rank)


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
  t_all = contract(_cast(x, st.dtype), st.x, _cat_a(st, f1s), st.a, st.t, precision=st.precision)
  ys, ts = [], []
  for f2, m, t in zip(f2s, st.members, _split(t_all, st.t_rank, st.ranks)):
    t = _scaled(t, m.scale)
    ys.append(_cast(_expand(t, m.t, f2, m.l2, m.out, m.fused, st.precision), m.out_dtype))
    ts.append(t)
  saved = roots if st.rebuild is not None else x
  return tuple(ys), (saved, f1s, f2s, tuple(ts), jnp.zeros((0,), x.dtype))


def _group_bwd(st: _Group, res, dys):
  saved, f1s, f2s, ts, x_dtype = res
  dts, df2s = [], []
  for dy, f2, m, t in zip(dys, f2s, st.members, ts):
    dy = _cast(dy, f2.dtype)
    dts.append(_scaled(contract(dy, m.out, f2, m.l2, m.t, precision=st.precision), m.scale))
    df2s.append(contract(t, m.t, dy, m.out, m.l2, precision=st.precision))
  dt = lax.concatenate(dts, st.t_rank)
  x, _, dt, _ = _late_input(st.rebuild, saved, None, dt)
  df1 = contract(_cast(x, st.dtype), st.x, dt, st.t, st.a, precision=st.precision)
  df1s = [_transpose(d, [list(p).index(i) for i in range(d.ndim)])  # each back to its own axis order
          for d, p in zip(_split(df1, st.a_rank, st.ranks), st.perms)]
  dx = _expand(dt, st.t, _cat_a(st, f1s), st.a, st.x, st.fused, st.precision)
  return _cast(dx, x_dtype.dtype), None, tuple(df1s), tuple(df2s)


_group.defvjp(_group_fwd, _group_bwd)


def groupable(v: LowRank, plan: "DotPlan") -> bool:
  """Whether the layer may join a group (``grouped_dot_out``): a plain LoRA matmul whose input
  meets ``A`` first over input axes only."""
  if not v.has_factors or plan.first != "a" or v.source.spec.dropout > 0.0:
    return False
  if type(v.source.spec.variant).dot is not _plain_dot():
    return False
  a = list(v.a_labels)
  return a.count(RANK) == 1 and all(l is RANK or l in plan.x_labels for l in a)


def _plain_dot():
  from jlora._variant import Variant

  return Variant.dot


def grouped_dot_out(ctx, vs, x, base_outs, plans, *, recompute: Recompute | None = None) -> list | None:
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
                      fused=ctx.fused_expansion and spec.rank <= FUSED_EXPANSION_MAX_RANK))
  total = sum(m.rank for m in ms)
  st = _Group(x=xl, a=a_l, t=tl, a_rank=a_l.index(RANK), t_rank=tl.index(RANK), perms=tuple(perms),
              members=tuple(ms), precision=p0.precision, dtype=v0.a.dtype,
              rebuild=None if recompute is None else recompute.rebuild,
              fused=ctx.fused_expansion and total <= FUSED_EXPANSION_MAX_RANK)
  roots = () if recompute is None else tuple(recompute.roots)
  for _ in vs:
    ctx.next_key()  # one dropout site per layer, as when each is served alone
  terms = _group(st, x, roots, tuple(v.a for v in vs), tuple(v.b for v in vs))
  return [add_term(ctx, v, base, term) for v, base, term in zip(vs, base_outs, terms)]


@dataclasses.dataclass(frozen=True)
class DotPlan:
  """How a ``dot_general`` consumes a LoRA kernel, in labels (see ``dot_plan``)."""

  v_is_lhs: bool
  x_labels: tuple  # labels of the layer input's axes (contracted/batch ones shared with the kernel)
  out_labels: tuple  # labels of the result's axes
  first: str  # the factor the input meets first: "a" (or "b" for a tied embedding used as output)
  precision: Any
  out_dtype: Any
  recompute: Recompute | None = None  # how the backward pass may rebuild the input instead of saving it


def dot_plan(v: LowRank, x, *, v_is_lhs: bool, dimension_numbers, precision, out_dtype,
             recompute: Recompute | None = None) -> DotPlan:
  """Labels the input and the result of ``dot_general(x, v)`` (or ``(v, x)``).

  ``recompute`` (from the interpreter) says how the backward pass can rebuild ``x``
  from values it keeps anyway; ``lora_dot_term`` uses it.
  """
  (lc, rc), (lb, rb) = dimension_numbers
  if v_is_lhs:
    vc, xc, vb, xb = lc, rc, lb, rb
  else:
    xc, vc, xb, vb = lc, rc, lb, rb
  x_labels: list[Label] = [new_label() for _ in range(x.ndim)]
  for xi, vi in zip(xc, vc):
    x_labels[xi] = v.labels[vi]
  for xi, vi in zip(xb, vb):
    x_labels[xi] = v.labels[vi]
  batch = [v.labels[i] for i in vb]
  x_free = [x_labels[i] for i in range(x.ndim) if i not in xc and i not in xb]
  v_free = [v.labels[i] for i in range(len(v.labels)) if i not in vc and i not in vb]
  out_labels = batch + (v_free + x_free if v_is_lhs else x_free + v_free)
  first = _orientation(v, frozenset(v.labels[i] for i in vc), "contracted")
  return DotPlan(v_is_lhs, tuple(x_labels), tuple(out_labels), first, precision, out_dtype, recompute)


def lowrank_labels(x_labels, l1, l2, out_labels) -> tuple:
  """``(x, f1, f2, t, out)`` labels of the two-step contraction ``(x·f1)·f2``."""
  keep = set(out_labels) | set(l2)
  t_labels: list[Label] = []
  for l in list(x_labels) + list(l1):
    if l in keep and l not in t_labels:
      t_labels.append(l)
  return tuple(x_labels), tuple(l1), tuple(l2), tuple(t_labels), tuple(out_labels)


def two_step(x, f1, f2, *, labels, scale, precision, fused: bool):
  """``scale · ((x·f1)·f2)`` with ``labels`` from ``lowrank_labels``; fused expansion if asked.

  The fused form runs under a custom VJP (``lowrank_term``) that saves ``x``.
  """
  if fused:
    return lowrank_term(x, f1, f2, labels=labels, scale=scale, precision=precision, fused=True)
  return _lowrank_term(x, f1, f2, scale=scale, labels=labels, precision=precision, fused=False)[0]


def add_term(ctx, v: LowRank, base_out, term):
  """The layer output ``base_out + term``, materialised once under the custom-VJP lowering.

  XLA:CPU fuses a cheap elementwise producer into every consumer that reads it,
  so the sum would be recomputed by each of them, forward and backward, keeping
  both the base output and the term alive. Dividing the sum by a runtime one
  (exact) makes it an "expensive" producer that XLA computes once, into a
  buffer that takes the base output's place.
  """
  term = _cast(term, base_out.dtype)
  if (not getattr(ctx, "custom_vjp", False) or base_out.shape != term.shape
      or not jnp.issubdtype(base_out.dtype, jnp.floating)):
    return base_out + term
  return _materialized_sum(base_out, term, _runtime_one(next(iter(v.factors.values()))))


@jax.custom_vjp
def _materialized_sum(base, term, one):
  """``(base + term) / one`` (see ``add_term``), under a custom VJP so that tracing it under
  ``jax.grad`` costs no linearisation."""
  return lax.div(lax.add(base, term), _cast(one, base.dtype))


def _materialized_sum_fwd(base, term, one):
  return _materialized_sum(base, term, one), one


def _materialized_sum_bwd(one, g):
  # The cotangent is divided by the same runtime one, i.e. materialised once too: it is a sum
  # of several (a residual stream's), which XLA would otherwise fuse into both consumers (the
  # base matmul's transpose and the low-rank term's), keeping the summands alive longer
  # (temp memory 1.23× the floor instead of 1.05× in benchmarks/train_step.py --quick).
  g = lax.div(g, _cast(one, g.dtype))
  return g, g, jnp.zeros_like(one)


_materialized_sum.defvjp(_materialized_sum_fwd, _materialized_sum_bwd)


def _runtime_one(f):
  """``1.0`` computed from a small, always live factor, so that XLA cannot fold it away."""
  zero = lax.mul(_cast(_first(lax.stop_gradient(f)), jnp.float32), np.float32(0.0))
  return lax.add(zero, np.float32(1.0))


# Plain ``lax`` operations below: each ``jnp`` function is a nested jit, which is cheap to
# trace alone but costs a linearization of its own under ``jax.grad``, and a model has
# hundreds of adapted layers (see ``benchmarks/compile_time.py``).


def _cast(x, dtype):
  return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def _transpose(x, perm):
  """``lax.transpose``, or ``x`` itself for the identity permutation."""
  return x if list(perm) == list(range(len(perm))) else lax.transpose(x, tuple(perm))


def _first(x):
  """The first element of ``x`` as a scalar."""
  if x.ndim == 0:
    return x
  return lax.reshape(lax.slice(x, (0,) * x.ndim, (1,) * x.ndim), ())


def _scaled(x, scale):
  """``x · scale`` for a Python or array scalar."""
  return lax.mul(x, _cast(jnp.asarray(scale), x.dtype) if not isinstance(scale, (int, float))
                 else np.asarray(scale, x.dtype))


def lora_input(ctx, v: LowRank, x):
  """The layer input as the low-rank path sees it: LoRA dropout (training only), factor dtype."""
  spec = v.source.spec
  return _dropout(x, spec.dropout, ctx.next_key()).astype(v.a.dtype)


def lora_dot_term(ctx, v: LowRank, x, plan: DotPlan, *, scale, factors=None):
  """The scaled low-rank term of a ``dot_general`` for factors ``a`` and ``b``.

  ``factors`` optionally replaces ``(a, b)`` (same labels), e.g. a variant's
  effective factors. Under the custom-VJP lowering the term saves neither the
  input when ``plan.recompute`` can rebuild it nor a dropout mask.
  """
  a, b = factors if factors is not None else (v.a, v.b)
  if plan.first == "a":
    f1, l1, f2, l2 = a, v.a_labels, b, v.b_labels
  else:
    f1, l1, f2, l2 = b, v.b_labels, a, v.a_labels
  labels = lowrank_labels(plan.x_labels, l1, l2, plan.out_labels)
  spec = v.source.spec
  fused = ctx.fused_expansion and spec.rank <= FUSED_EXPANSION_MAX_RANK
  if getattr(ctx, "custom_vjp", False):
    y = lowrank_term(x, f1, f2, labels=labels, scale=scale, precision=plan.precision, fused=fused,
                     rate=spec.dropout, key=ctx.next_key(), recompute=plan.recompute,
                     out_dtype=plan.out_dtype)
  else:
    xin = lora_input(ctx, v, x)
    y = _cast(two_step(xin, f1, f2, labels=labels, scale=scale, precision=plan.precision, fused=fused),
              plan.out_dtype)
  return y


# -- convolution and lookup --------------------------------------------------------------


def conv(v: LowRank, x, *, params: dict, out_dtype, key):
  """Low-rank part of a convolution: a conv to ``rank`` channels, then a 1x1 projection."""
  if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
    raise Unsupported("grouped convolutions (feature_group_count/batch_group_count > 1)")
  dn = params["dimension_numbers"]
  rhs_spec, out_spec = dn.rhs_spec, dn.out_spec
  out_label = v.labels[rhs_spec[0]]
  contracted = frozenset(l for i, l in enumerate(v.labels) if i != rhs_spec[0])
  first = _orientation(v, contracted, "convolved")
  if first != "a" or v.shared or set(v.b_labels) != {RANK, out_label}:
    raise Unsupported("a convolution whose output-feature axis is not B's only axis")
  spec = v.source.spec
  perm = [v.a_labels.index(RANK if l == out_label else l) for l in v.labels]
  a_view = jnp.transpose(v.a, perm)
  xin = _dropout(x, spec.dropout, key).astype(v.a.dtype)
  conv_params = dict(params)
  conv_params["preferred_element_type"] = None
  t = lax.conv_general_dilated_p.bind(xin, a_view, **conv_params)
  c = out_spec[1]
  t = t * jnp.asarray(spec.scale, t.dtype)
  b = jnp.transpose(v.b, [v.b_labels.index(RANK), v.b_labels.index(out_label)])
  y = jnp.moveaxis(jnp.tensordot(t, b, axes=[[c], [0]], precision=params.get("precision")), -1, c)
  return y.astype(out_dtype)


def gather(v: LowRank, indices, *, params: dict, out_dtype, rows=None):
  """Low-rank part of an embedding lookup: gather rows of one factor, then project.

  ``rows(fg, fg_labels, idx_labels) -> fg`` optionally replaces the scaling of
  the gathered rows ``fg`` (labels: the indices' batch axes ``idx_labels``, then
  the factor's remaining axes), e.g. a bank's per-example slot weights.
  """
  dn = params["dimension_numbers"]
  if dn.operand_batching_dims or dn.start_indices_batching_dims:
    raise Unsupported("a batched gather")
  slice_sizes = params["slice_sizes"]
  shape = tuple(v.base.shape)
  indexed = [v.labels[d] for d in dn.start_index_map]
  if not set(dn.collapsed_slice_dims) <= set(dn.start_index_map):
    raise Unsupported("a gather collapsing an axis it does not index")
  for d in range(len(shape)):
    if d not in dn.start_index_map and slice_sizes[d] != shape[d]:
      raise Unsupported("a gather taking a partial slice of a non-indexed axis")
  spec = v.source.spec
  c = frozenset(l for l in indexed if l.axes)
  a_only = frozenset(l for l in v.a_only if l.axes)
  b_only = frozenset(l for l in v.b_only if l.axes)
  if c and c <= a_only:
    f, fl, g, gl = v.a, v.a_labels, v.b, v.b_labels
  elif c and c <= b_only and spec.layout.embedding:
    f, fl, g, gl = v.b, v.b_labels, v.a, v.a_labels
  else:
    raise OrientationError(
        f"{v.path!r} is looked up (gathered) along kernel axes {tuple(sorted(prov(c)))}, but "
        f"its adapter's input axes are {spec.in_axes}. Give the rule "
        "layout=jlora.KernelLayout(in_axes=<the looked-up axes>, embedding=True) or use "
        "jlora.infer_layout."
    )
  collapsed = [v.labels[d] for d in dn.collapsed_slice_dims]
  nb = indices.ndim - 1
  kept = [l for l in fl if l not in collapsed]
  new_dn = lax.GatherDimensionNumbers(
      offset_dims=tuple(range(nb, nb + len(kept))),
      collapsed_slice_dims=tuple(sorted(fl.index(l) for l in collapsed)),
      start_index_map=tuple(fl.index(l) for l in indexed),
  )
  sizes = tuple(
      slice_sizes[v.labels.index(l)] if l in indexed else f.shape[k] for k, l in enumerate(fl)
  )
  fg = lax.gather(f, indices, new_dn, sizes, indices_are_sorted=params["indices_are_sorted"],
                  unique_indices=params["unique_indices"], mode=params["mode"],
                  fill_value=params["fill_value"])
  idx_labels = [new_label() for _ in range(nb)]
  fg_labels = idx_labels + kept
  # Output layout of the original gather: offset dims carry the non-collapsed value axes.
  v_kept = [l for l in v.labels if l not in collapsed]
  out_labels: list[Label] = []
  it_idx, it_off = iter(idx_labels), iter(v_kept)
  for d in range(nb + len(v_kept)):
    out_labels.append(next(it_off) if d in dn.offset_dims else next(it_idx))
  L = Letters()
  fg = fg * jnp.asarray(spec.scale, fg.dtype) if rows is None else rows(fg, tuple(fg_labels), tuple(idx_labels))
  y = jnp.einsum(f"{L(fg_labels)},{L(gl)}->{L(out_labels)}", fg, g)
  return y.astype(out_dtype)
