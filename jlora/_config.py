"""LoRA configuration: ``LoraConfig``, ordered target ``Rule``s and ``KernelLayout``."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jlora._init_methods import init_method_names, resolve_init
from jlora._tree import close_matches
from jlora._variant import PLAIN, Variant

# Built in: "default" and "gaussian"; subpackages register more (``jlora._init_methods.register_init``).
InitMethod = str


def adapter_scale(*, alpha: float, rank: int, rslora: bool) -> float:
  """The output scale of one adapter: ``alpha/rank``, or ``alpha/sqrt(rank)`` with rsLoRA.

  Example:
    >>> from jlora._config import adapter_scale
    >>> adapter_scale(alpha=16, rank=4, rslora=False), adapter_scale(alpha=16, rank=4, rslora=True)
    (4.0, 8.0)
  """
  return float(alpha) / (math.sqrt(rank) if rslora else rank)


def _unknown_option_error(cls_name: str, unknown: Sequence[str], known: Sequence[str]) -> ValueError:
  hints = []
  for name in unknown:
    near = close_matches(name, known, n=1)
    hints.append(f"{name!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
  return ValueError(
      f"{cls_name}: unknown option(s) {', '.join(hints)}. Known options: {', '.join(known)}."
  )


def _reject_unknown_kwargs(cls):
  """Makes a kw-only dataclass raise ``ValueError`` (with a hint) on unknown options."""
  original = cls.__init__
  known = tuple(f.name for f in dataclasses.fields(cls) if f.init)

  def __init__(self, *args, **kwargs):
    unknown = [k for k in kwargs if k not in known]
    if unknown:
      raise _unknown_option_error(cls.__name__, unknown, known)
    original(self, *args, **kwargs)

  __init__.__doc__ = original.__doc__
  __init__.__signature__ = __import__("inspect").signature(original)
  cls.__init__ = __init__
  return cls


@_reject_unknown_kwargs
@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelLayout:
  """Which axes of a kernel the adapter treats as input, stacked, and output axes.

  ``A`` has shape ``(*batch, *in, rank)`` and ``B`` has shape
  ``(*batch, rank, *out)``; every kernel axis not listed in ``in_axes`` or
  ``batch_axes`` is an output axis.

  Example:
    >>> import jlora
    >>> jlora.KernelLayout(in_axes=(1,))  # a GPT-2 Conv1D kernel stored (out, in)
    KernelLayout(in_axes=(1,), batch_axes=(), embedding=False)
  """

  # Kernel axes contracted with the layer input (covered by A).
  in_axes: tuple[int, ...]
  # Leading "stacked layer" axes (scan / vmap over layers), shared by A and B.
  batch_axes: tuple[int, ...] = ()
  # An embedding table: looked up with a gather over ``in_axes``; PEFT initialises
  # it with A = 0 and B ~ N(0, 1), and it may also be used transposed (tied output).
  embedding: bool = False

  def __post_init__(self):
    object.__setattr__(self, "in_axes", tuple(int(a) for a in self.in_axes))
    object.__setattr__(self, "batch_axes", tuple(int(a) for a in self.batch_axes))
    if not self.in_axes:
      raise ValueError("KernelLayout.in_axes must name at least one kernel axis.")
    both = set(self.in_axes) & set(self.batch_axes)
    if both:
      raise ValueError(f"KernelLayout: axes {sorted(both)} are both input and batch axes.")
    if len(set(self.in_axes)) != len(self.in_axes) or len(set(self.batch_axes)) != len(self.batch_axes):
      raise ValueError("KernelLayout: repeated axis in in_axes or batch_axes.")

  def out_axes(self, ndim: int) -> tuple[int, ...]:
    """The kernel axes B covers: every axis that is neither an input nor a batch axis."""
    norm = self.normalized(ndim)
    used = set(norm.in_axes) | set(norm.batch_axes)
    return tuple(i for i in range(ndim) if i not in used)

  def normalized(self, ndim: int) -> "KernelLayout":
    """Returns the layout with negative axes resolved for an ``ndim``-D kernel."""

    def norm(axes):
      out = []
      for a in axes:
        if not -ndim <= a < ndim:
          raise ValueError(f"axis {a} is out of range for a {ndim}-D kernel")
        out.append(a % ndim)
      return tuple(sorted(out))

    return dataclasses.replace(self, in_axes=norm(self.in_axes), batch_axes=norm(self.batch_axes))


@_reject_unknown_kwargs
@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
  """One target rule: a regex on the ``/``-joined parameter path, with overrides.

  Rules are tried in order and the first whose ``pattern`` *fullmatches* a path
  wins (PEFT's ``rank_pattern`` / ``alpha_pattern`` become per-rule overrides).

  Example:
    >>> import jlora
    >>> jlora.Rule(pattern=r".*/mlp/.*/kernel", rank=16, rslora=True)
    Rule(pattern='.*/mlp/.*/kernel', rank=16, alpha=None, layout=None, rslora=True)
  """

  # Regex matched with ``re.fullmatch`` against paths such as ``layers/0/attn/query/kernel``.
  pattern: str
  # Rank for the kernels this rule matches; ``None`` uses ``LoraConfig.rank``.
  rank: int | None = None
  # Alpha for the kernels this rule matches; ``None`` uses ``LoraConfig.alpha``.
  alpha: float | None = None
  # Explicit kernel layout; ``None`` infers it (see ``jlora.init``).
  layout: KernelLayout | None = None
  # rsLoRA scaling (alpha/sqrt(rank)) for these kernels; ``None`` uses ``LoraConfig.rslora``.
  rslora: bool | None = None

  def __post_init__(self):
    if not isinstance(self.pattern, str):
      raise ValueError(f"Rule.pattern must be a regex string, got {type(self.pattern).__name__}.")
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"Rule.pattern {self.pattern!r} is not a valid regex: {e}.") from None
    if self.rank is not None:
      _check_rank(self.rank, f"Rule({self.pattern!r}).rank")
    if self.alpha is not None:
      _check_alpha(self.alpha, f"Rule({self.pattern!r}).alpha")
    if self.layout is not None and not isinstance(self.layout, KernelLayout):
      raise ValueError(f"Rule({self.pattern!r}).layout must be a jlora.KernelLayout.")
    if self.rslora is not None and not isinstance(self.rslora, bool):
      raise ValueError(f"Rule({self.pattern!r}).rslora must be True, False or None (LoraConfig.rslora), got "
                       f"{self.rslora!r}.")


def _check_rank(rank: Any, what: str) -> None:
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f"{what} must be a positive integer, got {rank!r}.")


def _check_alpha(alpha: Any, what: str) -> None:
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or not math.isfinite(alpha) or alpha <= 0:
    raise ValueError(f"{what} must be a finite number > 0, got {alpha!r} (scale is alpha/rank).")


@_reject_unknown_kwargs
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """Immutable LoRA configuration.

  Example:
    >>> import jlora
    >>> cfg = jlora.LoraConfig(rank=8, alpha=16, targets=r".*/(query|value)/kernel")
    >>> cfg.scale_for(rank=8, alpha=16)
    2.0
  """

  # Default adapter rank r.
  rank: int = 8
  # Default alpha; the adapter output is scaled by alpha/rank (alpha/sqrt(rank) with rslora).
  alpha: float = 8.0
  # rsLoRA scaling alpha/sqrt(rank) instead of alpha/rank.
  rslora: bool = False
  # Dropout rate on the LoRA input (only applied when a dropout key is passed to the wrapped fn).
  dropout: float = 0.0
  # Which kernels get adapters: a regex, or an ordered sequence of regexes / ``Rule``s.
  targets: str | Rule | Sequence[str | Rule] = ()
  # Regexes (fullmatch) of paths that never get adapters, even if a target matches.
  exclude: str | Sequence[str] = ()
  # Initialisation: "default" (PEFT: A kaiming-uniform, B = 0), "gaussian" (A ~ N(0, (1/r)^2),
  # B = 0), or a method a subpackage registers (e.g. "pissa", "olora", "loftq").
  init: InitMethod = "default"
  # dtype of A and B (float32 even for a bf16 base is the recommended default).
  adapter_dtype: Any = "float32"
  # The adapter family (plain LoRA by default; e.g. DoRA). See ``jlora.Variant``.
  variant: Variant = PLAIN
  # DoRA (weight-decomposed LoRA): short for ``variant=jlora.DoRA()``.
  dora: bool = False

  def __post_init__(self):
    _check_rank(self.rank, "LoraConfig.rank")
    _check_alpha(self.alpha, "LoraConfig.alpha")
    if not isinstance(self.rslora, bool):
      raise ValueError(f"LoraConfig.rslora must be a bool, got {self.rslora!r}.")
    if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoraConfig.dropout must be a float in [0, 1), got {self.dropout!r}.")
    targets = self.targets
    if isinstance(targets, (str, Rule)):
      targets = (targets,)
    rules = []
    for i, t in enumerate(targets):
      if isinstance(t, str):
        rules.append(Rule(pattern=t))
      elif isinstance(t, Rule):
        rules.append(t)
      elif isinstance(t, Mapping):
        rules.append(Rule(**t))
      else:
        raise ValueError(
            f"LoraConfig.targets[{i}] must be a regex string or a jlora.Rule, got {type(t).__name__}."
        )
    if not rules:
      raise ValueError(
          "LoraConfig.targets is empty: give a regex (fullmatch on '/'-joined parameter paths), "
          "e.g. targets=r'.*/(query|value)/kernel'."
      )
    object.__setattr__(self, "targets", tuple(rules))
    exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
    for e in exclude:
      if not isinstance(e, str):
        raise ValueError(f"LoraConfig.exclude entries must be regex strings, got {e!r}.")
      try:
        re.compile(e)
      except re.error as err:
        raise ValueError(f"LoraConfig.exclude {e!r} is not a valid regex: {err}.") from None
    object.__setattr__(self, "exclude", exclude)
    if not isinstance(self.variant, Variant):
      raise ValueError(f"LoraConfig.variant must be a jlora.Variant, got {type(self.variant).__name__}.")
    if not isinstance(self.dora, bool):
      raise ValueError(f"LoraConfig.dora must be a bool, got {self.dora!r}.")
    if self.dora:
      dora = Variant.from_json({"name": "dora"})
      if self.variant not in (PLAIN, dora):
        raise ValueError(f"LoraConfig: dora=True asks for the DoRA variant but variant={self.variant!r} is "
                         "given; set one of them.")
      object.__setattr__(self, "variant", dora)
    elif self.variant.name == "dora":
      object.__setattr__(self, "dora", True)
    if self.init == "default" and self.variant.default_init:
      object.__setattr__(self, "init", self.variant.default_init)
    if not isinstance(self.init, str) or resolve_init(self.init) is None:
      raise ValueError(f"LoraConfig.init must be one of {init_method_names()}, got {self.init!r}.")
    try:
      dt = np.dtype(self.adapter_dtype)
    except TypeError:
      raise ValueError(f"LoraConfig.adapter_dtype {self.adapter_dtype!r} is not a dtype.") from None
    import jax.numpy as jnp

    if not jnp.issubdtype(dt, jnp.floating):
      raise ValueError(f"LoraConfig.adapter_dtype must be a floating dtype, got {dt}.")
    object.__setattr__(self, "adapter_dtype", dt.name)

  def scale_for(self, *, rank: int, alpha: float) -> float:
    """The output scale for one adapter: alpha/rank, or alpha/sqrt(rank) with rslora."""
    return adapter_scale(alpha=alpha, rank=rank, rslora=self.rslora)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable description (checkpoint metadata); inverse of ``from_dict``."""
    d = dataclasses.asdict(self)
    d["targets"] = [
        {
            "pattern": r.pattern,
            "rank": r.rank,
            "alpha": r.alpha,
            "layout": None if r.layout is None else dataclasses.asdict(r.layout),
            "rslora": r.rslora,
        }
        for r in self.targets
    ]
    d["exclude"] = list(self.exclude)
    d["variant"] = self.variant.to_json()
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LoraConfig":
    """Builds a config from ``to_dict`` output (unknown keys raise ``ValueError``)."""
    d = dict(d)
    targets = []
    for t in d.get("targets", ()):
      if isinstance(t, Mapping):
        t = dict(t)
        if t.get("layout") is not None:
          t["layout"] = KernelLayout(**t["layout"])
        targets.append(Rule(**t))
      else:
        targets.append(t)
    d["targets"] = targets
    if "variant" in d:
      d["variant"] = Variant.from_json(d["variant"])
    return cls(**d)
