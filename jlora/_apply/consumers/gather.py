"""The low-rank term of an embedding lookup: gather rows of one factor, then project with the other."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jlora._apply.lowrank import Label, Letters, LowRank, new_label, prov
from jlora._errors import OrientationError, Unsupported


def gather_term(v: LowRank, indices, *, params: dict, out_dtype, rows=None):
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
