"""Reading an adapter directory a user names: jlora's (``adapter/``) or PEFT's (``peft/``).

Shared by ``jlora-generate --adapter`` and ``jlora-finetune --init-adapter``; every
problem is a ``UserError`` naming the option and the directory.
"""

from __future__ import annotations

import os
from typing import Any

import jlora
from jlora import _checkpoint as ck
from jlora import peft as peft_lib
from jlora.finetune.cli import UserError, user_error_types


def kind(path: str, *, option: str = "--adapter") -> str:
  """``"peft"`` or ``"jlora"`` for an adapter directory; a ``UserError`` for anything else.

  Example:
    >>> import tempfile
    >>> from jlora.finetune.adapters import kind
    >>> try:
    ...   kind(tempfile.mkdtemp(), option="--init-adapter")
    ... except ValueError as e:
    ...   print(str(e).split(" is neither")[1][:9])
     a jlora
  """
  if not os.path.exists(path):
    raise UserError(f"{option} {path!r}: no such directory")
  if not os.path.isdir(path):
    raise UserError(f"{option} {path!r} is a file; give an adapter directory")
  if os.path.exists(os.path.join(path, "adapter_config.json")):
    return "peft"
  if os.path.isdir(os.path.join(path, "meta")):
    return "jlora"
  raise UserError(f"{option} {path!r} is neither a jlora adapter (the adapter/ directory jlora-finetune writes) "
                  "nor a PEFT adapter (adapter_config.json and adapter_model.safetensors, e.g. the peft/ "
                  "directory)")


def info(path: str, adapter_kind: str, *, option: str = "--adapter") -> dict:
  """What an adapter says about its base and training: ``model_dir``, ``base_model``, ``bf16``, ``chat_template``."""
  try:
    if adapter_kind == "peft":
      base = peft_lib.read_config(path).get("base_model_name_or_path") or ""
      return {"model_dir": base, "base_model": base, "bf16": None, "chat_template": None}
    meta = jlora.read_adapter_metadata(path)
  except user_error_types():  # already says what and where (e.g. an unsupported PEFT feature)
    raise
  except (OSError, ValueError) as e:  # an unreadable file, bad JSON, not a jlora adapter
    raise UserError(f"{option} {path!r}: cannot read it ({type(e).__name__}: {e})") from None
  train_config = meta.get("train_config") or {}
  return {"model_dir": meta.get("base_model_dir") or meta.get("base_model") or "",
          "base_model": meta.get("base_model") or "", "bf16": train_config.get("bf16"),
          "chat_template": train_config.get("chat_template")}


def load(path: str, adapter_kind: str, loaded: Any, *, check_base: bool = True, fix: str,
         option: str = "--adapter") -> Any:
  """The adapter at ``path`` attached to ``loaded.params`` (the same base arrays, new factors).

  Raises:
    jlora.AdapterMismatchError: it records another base (``fix`` ends the message).
    UserError: damaged files.
  """
  try:
    if adapter_kind == "jlora":
      if check_base:
        ck.verify_base(jlora.read_adapter_metadata(path), loaded.params, where=f"{option} {path!r}", fix=fix)
      return jlora.load_adapter(path, loaded.params, check_base=False)
    if check_base:
      peft_lib.verify_base(path, loaded.params, fix=fix)
    return peft_lib.load(path, loaded.params, module_map=loaded.module_map, layout=loaded.layout,
                         check_base=False)
  except user_error_types():  # a wrong base or an unsupported PEFT feature: already one clear line
    raise
  except (OSError, ValueError) as e:  # Orbax / safetensors reading damaged files
    raise UserError(f"{option} {path!r}: cannot read it ({type(e).__name__}: {e})") from None
