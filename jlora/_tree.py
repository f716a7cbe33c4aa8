"""Pytree helpers shared by every module: one way to turn a path, or a leaf, into a string."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

KeyPath = tuple[Any, ...]


def path_str(path: KeyPath) -> str:
  """Returns the ``/``-joined string form of a pytree key path.

  Dict keys, attribute names and sequence indices become path segments.
  Flax NNX wraps each array in a ``Variable`` whose child is reached through
  ``.value``; that segment is dropped so that linen and NNX trees give the
  same strings (``lin/kernel``).

  Example:
    >>> import jax
    >>> from jlora._tree import path_str
    >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path({"a": {"b": 1}})[0]]
    ['a/b']
  """
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      if key.name == "value":
        continue
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:  # pragma: no cover - future key types
      parts.append(str(key))
  return "/".join(parts)


def leaves_with_paths(
    tree: Any, *, is_leaf: Callable[[Any], bool] | None = None
) -> Iterator[tuple[str, Any]]:
  """Yields ``(path_string, leaf)`` pairs in flattening order."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
    yield path_str(path), leaf


def is_array_like(x: Any) -> bool:
  """True for anything with a shape and dtype that JAX can trace or describe."""
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def shape_and_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
  return tuple(x.shape), np.dtype(x.dtype)


def describe_leaf(x: Any) -> str:
  """``dtype[shape]`` for an array-like child of a jlora pytree node, ``repr`` for anything else.

  Pytree nodes print whatever their children are: arrays, ``None`` halves of
  ``jlora.split``, or the results of ``jax.tree.map`` (shapes, strings, ...). A
  child that is itself a pytree node (a kernel stored in another form, such as
  ``jlora.NF4Weight``, or a tuple) describes itself.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora._tree import describe_leaf
    >>> describe_leaf(jnp.ones((2, 3))), describe_leaf((2, 3)), describe_leaf(None)
    ('float32[2, 3]', '(2, 3)', 'None')
  """
  if not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x)):
    return repr(x)
  shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
  if isinstance(shape, tuple) and dtype is not None:
    try:
      return f"{np.dtype(dtype).name}{list(shape)}"
    except TypeError:  # e.g. a PRNG key dtype
      return f"{dtype}{list(shape)}"
  return repr(x)


def close_matches(name: str, candidates: Sequence[str], n: int = 3) -> list[str]:
  """Candidates that look like ``name``, for "did you mean" hints."""
  return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
