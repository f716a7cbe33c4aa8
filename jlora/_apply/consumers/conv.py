"""The low-rank term of a convolution: a convolution to ``rank`` channels, then a 1x1 projection."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jlora._apply.consumers.layer_input import dropout
from jlora._apply.consumers.plans import orientation
from jlora._apply.lowrank import RANK, LowRank
from jlora._errors import Unsupported


def conv_term(v: LowRank, x, *, params: dict, out_dtype, key):
  """Low-rank part of a convolution: a conv to ``rank`` channels, then a 1x1 projection."""
  if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
    raise Unsupported("grouped convolutions (feature_group_count/batch_group_count > 1)")
  dn = params["dimension_numbers"]
  rhs_spec, out_spec = dn.rhs_spec, dn.out_spec
  out_label = v.labels[rhs_spec[0]]
  contracted = frozenset(l for i, l in enumerate(v.labels) if i != rhs_spec[0])
  first = orientation(v, contracted, "convolved")
  if first != "a" or v.shared or set(v.b_labels) != {RANK, out_label}:
    raise Unsupported("a convolution whose output-feature axis is not B's only axis")
  spec = v.source.spec
  perm = [v.a_labels.index(RANK if l == out_label else l) for l in v.labels]
  a_view = jnp.transpose(v.a, perm)
  xin = dropout(x, spec.dropout, key).astype(v.a.dtype)
  conv_params = dict(params)
  conv_params["preferred_element_type"] = None
  t = lax.conv_general_dilated_p.bind(xin, a_view, **conv_params)
  c = out_spec[1]
  t = t * jnp.asarray(spec.scale, t.dtype)
  b = jnp.transpose(v.b, [v.b_labels.index(RANK), v.b_labels.index(out_label)])
  y = jnp.moveaxis(jnp.tensordot(t, b, axes=[[c], [0]], precision=params.get("precision")), -1, c)
  return y.astype(out_dtype)
