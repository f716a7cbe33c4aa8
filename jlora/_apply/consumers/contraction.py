"""The two-step contraction ``(x·f1)·f2`` on labels, in plain ``lax`` operations.

Every consumer computes its low-rank term as two contractions: the layer input
with the factor holding the contracted labels first (``t = x·f1``), then ``t``
with the other factor. Labels (``jlora._apply.lowrank``) name the axes, so the
same code serves any kernel layout. ``lowrank_labels`` gives the labels of the
five arrays involved; ``contract`` is one ``lax.dot_general``; ``expand`` is the
rank-``r`` expansion ``t·f2``, optionally as ``r`` fused multiply-adds.

Plain ``lax`` operations throughout: each ``jnp`` function is a nested jit, which
is cheap to trace alone but costs a linearization of its own under ``jax.grad``,
and a model has hundreds of adapted layers (see ``benchmarks/compile_time.py``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora._apply.lowrank import RANK, Label, Letters


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
  return transpose(out, [got.index(l) for l in lo])


def expand(t, t_labels, f, f_labels, out_labels, fused: bool, precision=None):
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


def contract_two_step(x, f1, f2, *, scale, labels, precision, fused):
  """``(scale · einsum(einsum(x, f1), f2), t)`` with labels ``(x, f1, f2, t, out)`` and ``t = scale·(x·f1)``."""
  xl, l1, l2, tl, ol = labels
  t = contract(x, xl, f1, l1, tl, precision=precision)
  t = scaled(t, scale)
  return expand(t, tl, f2, l2, ol, fused, precision), t


def lowrank_labels(x_labels, l1, l2, out_labels) -> tuple:
  """``(x, f1, f2, t, out)`` labels of the two-step contraction ``(x·f1)·f2``."""
  keep = set(out_labels) | set(l2)
  t_labels: list[Label] = []
  for l in list(x_labels) + list(l1):
    if l in keep and l not in t_labels:
      t_labels.append(l)
  return tuple(x_labels), tuple(l1), tuple(l2), tuple(t_labels), tuple(out_labels)


def cast(x, dtype):
  """``x`` converted to ``dtype`` (no operation when it already has it)."""
  return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def transpose(x, perm):
  """``lax.transpose``, or ``x`` itself for the identity permutation."""
  return x if list(perm) == list(range(len(perm))) else lax.transpose(x, tuple(perm))


def first(x):
  """The first element of ``x`` as a scalar."""
  if x.ndim == 0:
    return x
  return lax.reshape(lax.slice(x, (0,) * x.ndim, (1,) * x.ndim), ())


def scaled(x, scale):
  """``x · scale`` for a Python or array scalar."""
  return lax.mul(x, cast(jnp.asarray(scale), x.dtype) if not isinstance(scale, (int, float))
                 else np.asarray(scale, x.dtype))
