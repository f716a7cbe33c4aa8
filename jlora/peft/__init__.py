"""Hugging Face PEFT LoRA format: export to and import from ``adapter_config.json`` +
``adapter_model.safetensors``, verified against real PEFT in the tests.

Example:
  >>> import jlora.peft
  >>> sorted(n for n in jlora.peft.__all__)
  ['ModuleMap', 'PeftFormatError', 'UnverifiedBaseWarning', 'load', 'read_base_fingerprint',
   'read_config', 'save', 'verify_base']
"""

from jlora.peft._format import PeftFormatError
from jlora.peft._format import UnverifiedBaseWarning
from jlora.peft._load import load
from jlora.peft._load import read_base_fingerprint
from jlora.peft._load import read_config
from jlora.peft._load import verify_base
from jlora.peft._mapping import ModuleMap
from jlora.peft._save import save

__all__ = [
    "ModuleMap",
    "PeftFormatError",
    "UnverifiedBaseWarning",
    "load",
    "read_base_fingerprint",
    "read_config",
    "save",
    "verify_base",
]
