"""Adapter directories (jlora checkpoints or Hugging Face PEFT) into LoRA trees and bank slots."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from jlora import peft
from jlora._checkpoint import load_adapter
from jlora._merge import unload
from jlora.multi._bank import put, stack

Params = Any


def is_peft_dir(directory: str) -> bool:
  """True for a Hugging Face PEFT adapter directory (``adapter_config.json``)."""
  return os.path.exists(os.path.join(directory, "adapter_config.json"))


def load(directory: str, base: Params, *, model_type: str | None = None, module_map: Any = None,
         layout: Mapping[str, Any] | None = None, check_base: bool = True) -> Params:
  """Loads one adapter directory, jlora (Orbax) or PEFT format, onto ``base``.

  Args:
    directory: a ``jlora.save_adapter`` checkpoint or a PEFT ``save_pretrained`` directory.
    base: the base parameters (plain arrays; the bank's base is ``jlora.unload(bank)``).
    model_type, module_map, layout: how PEFT module names map to ``base`` paths
      (see ``jlora.peft.load``); unused for jlora checkpoints.
    check_base: refuse a jlora checkpoint saved for another base (weights fingerprint).

  Returns:
    A LoRA tree on ``base``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, jlora.multi, tempfile, os
    >>> base = {"w": jnp.ones((4, 4))}
    >>> lp = jlora.init(jax.random.key(0), base, jlora.LoraConfig(rank=2, targets="w"))
    >>> d = jlora.save_adapter(os.path.join(tempfile.mkdtemp(), "a"), lp)
    >>> jlora.multi.load(d, base)["w"].spec.rank
    2
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"jlora.multi.load: no adapter directory at {directory!r}.")
  if is_peft_dir(directory):
    return peft.load(directory, base, model_type=model_type, module_map=module_map, layout=layout)
  return load_adapter(directory, base, check_base=check_base)


def load_bank(directories: Sequence[str], base: Params, *, slots: int | None = None, rank: int | None = None,
              strategy: str = "auto", **load_kwargs: Any) -> Params:
  """A bank (``jlora.stack``) of the adapters in ``directories``, slot ``i`` holding ``directories[i]``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, jlora.multi, tempfile, os
    >>> base = {"w": jnp.ones((4, 4))}
    >>> ds = [jlora.save_adapter(os.path.join(tempfile.mkdtemp(), "a"), jlora.init(
    ...     jax.random.key(i), base, jlora.LoraConfig(rank=i + 1, targets="w"))) for i in range(2)]
    >>> jlora.multi.load_bank(ds, base, slots=4)["w"].factors["ranks"].tolist()
    [1, 2, 0, 0]
  """
  return stack([load(d, base, **load_kwargs) for d in directories], slots=slots, rank=rank, strategy=strategy)


def put_directory(bank: Params, slot: int, directory: str, **load_kwargs: Any) -> Params:
  """``bank`` with the adapter of ``directory`` in ``slot`` (no recompilation; see ``put``).

  Example:
    >>> import jax, jax.numpy as jnp, jlora, jlora.multi, tempfile, os
    >>> base = {"w": jnp.ones((4, 4))}
    >>> lp = jlora.init(jax.random.key(0), base, jlora.LoraConfig(rank=2, targets="w"))
    >>> d = jlora.save_adapter(os.path.join(tempfile.mkdtemp(), "a"), lp)
    >>> jlora.multi.slots(jlora.multi.put_directory(jlora.stack([lp], slots=2), 1, d))
    [0, 1]
  """
  return put(bank, slot, load(directory, unload(bank), **load_kwargs))
