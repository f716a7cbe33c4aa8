"""Primitives the apply path handles that ``jax.extend.core.primitives`` does not export.

``ragged_dot_general_p`` (what ``jax.lax.ragged_dot`` binds: the grouped matmul of a
mixture of experts) is found by tracing one tiny ``ragged_dot``, not imported from
JAX's private modules.

Example:
  >>> from jlora._apply.primitives import ragged_dot_general_p
  >>> ragged_dot_general_p.name
  'ragged_dot_general'
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _traced_primitive(fn, *args):
  (eqn,) = jax.make_jaxpr(fn)(*args).jaxpr.eqns
  return eqn.primitive


ragged_dot_general_p = _traced_primitive(
    jax.lax.ragged_dot, jax.ShapeDtypeStruct((2, 2), jnp.float32), jax.ShapeDtypeStruct((1, 2, 2), jnp.float32),
    jax.ShapeDtypeStruct((1,), jnp.int32))
