"""Scanning layers of different kinds: groups of layers, each a repeated period, one ``lax.scan`` each.

A MoE model may mix layer kinds: Qwen2/3-MoE layers listed in ``mlp_only_layers``
or off the ``decoder_sparse_step`` have the dense MLP, the others the routed
experts. Parameters stay stacked per kind (the dense MLP's kernels over the dense
layers, the experts' over the sparse layers, attention and norms over all layers),
and the layers are split into **groups**: a group repeats one *period* of layer
kinds, and runs as one ``lax.scan`` over its repeats whose body holds one layer
per position of the period. Each position's parameters are a strided slice of the
stacks (``kernel[start:stop:step]``: a structural op that ``jlora.wrap`` carries the
adapters through).

``layer_groups`` chooses the split that traces the fewest layer bodies, so the
usual patterns compile in time independent of depth: one kind everywhere is one
group of period 1 (the dense decoder's single scan, with no slicing at all);
``decoder_sparse_step = s`` is one group of period ``s``; ``k`` leading dense layers
are two groups of period 1. Irregular patterns trace more bodies, never more
than one per layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class LayerGroup:
  """Layers ``start, ..., stop - 1``: ``(stop - start) / period`` repeats of the kinds of ``start:start + period``."""

  start: int
  stop: int
  period: int

  @property
  def repeats(self) -> int:
    return (self.stop - self.start) // self.period

  def layers(self, position: int) -> range:
    """The model layers at ``position`` of the period, one per repeat (the scanned axis)."""
    return range(self.start + position, self.stop, self.period)


def layer_groups(kinds: Sequence[Hashable]) -> tuple[LayerGroup, ...]:
  """Splits layers of the given kinds into groups that trace the fewest layer bodies in all.

  A group of period ``p`` traces ``p`` bodies whatever its repeats; among the
  splits with the fewest bodies, the one with the fewest groups wins.

  Example:
    >>> from jlora.models.groups import layer_groups
    >>> [(g.start, g.stop, g.period) for g in layer_groups("MMMM")]
    [(0, 4, 1)]
    >>> [(g.start, g.stop, g.period) for g in layer_groups("DMDMDM")]
    [(0, 6, 2)]
    >>> [(g.start, g.stop, g.period) for g in layer_groups("DMMM")]
    [(0, 1, 1), (1, 4, 1)]
  """
  kinds = list(kinds)
  n = len(kinds)
  # best[a]: (bodies, groups, split) for layers a..n-1.
  best: list[tuple[int, int, tuple[LayerGroup, ...]]] = [(0, 0, ())] * (n + 1)
  for a in range(n - 1, -1, -1):
    options = []
    for p in range(1, n - a + 1):
      reps = 1
      while a + (reps + 1) * p <= n and kinds[a + reps * p:a + (reps + 1) * p] == kinds[a:a + p]:
        reps += 1
      for r in range(1, reps + 1):
        bodies, groups, rest = best[a + r * p]
        options.append((p + bodies, 1 + groups, (LayerGroup(a, a + r * p, p), *rest)))
    best[a] = min(options, key=lambda o: (o[0], o[1]))
  return best[0][2]


def _slice_leaf(leaf: Any, own: Sequence[int], layers: range) -> Any:
  """The slices of a stacked ``leaf`` (over model layers ``own``) that belong to ``layers``."""
  rows = [own.index(i) for i in layers]
  step = rows[1] - rows[0] if len(rows) > 1 else 1
  if rows != list(range(rows[0], rows[0] + step * len(rows), step)):
    raise ValueError(f"layers {list(layers)} are not evenly spaced in the stack of layers {list(own)}")
  if rows[0] == 0 and step == 1 and len(rows) == leaf.shape[0]:
    return leaf  # the whole stack: no op at all (the dense decoder's path)
  return leaf[rows[0]:rows[-1] + 1:step]


def group_params(tree: Mapping[str, Any], stacked_over: Mapping[str, Sequence[int]], layers: range,
                 prefix: str = "layers") -> dict[str, Any]:
  """The parameters of ``layers`` (all of one kind): each stacked leaf sliced to those layers.

  ``stacked_over`` maps each leaf's path (``layers/...``) to the model layers it
  is stacked over; leaves that do not cover ``layers[0]`` (the other kind's MLP)
  are left out.
  """
  out = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}"
    if isinstance(value, Mapping):
      sub = group_params(value, stacked_over, layers, path)
      if sub:
        out[key] = sub
    elif layers[0] in stacked_over[path]:
      out[key] = _slice_leaf(value, stacked_over[path], layers)
  return out
