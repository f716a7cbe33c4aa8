"""Training memory from XLA's compile-time analysis: frozen and trained weights, gradients,
optimizer state and activations of full fine-tuning, LoRA, DoRA (and QLoRA) of one model.

``python -m jlora.memory --model gpt3-175b`` reproduces the LoRA paper's headline
from shapes alone; see ``memory_report`` and ``compare``.

Example:
  >>> import jlora.memory
  >>> "memory_report" in jlora.memory.__all__
  True
"""

from jlora.memory._compare import METHODS
from jlora.memory._compare import compare
from jlora.memory._compare import register_method
from jlora.memory._gpt import PRESETS
from jlora.memory._gpt import GPTConfig
from jlora.memory._report import CATEGORIES
from jlora.memory._report import MemoryReport
from jlora.memory._report import format_bytes
from jlora.memory._report import format_table
from jlora.memory._report import memory_report

__all__ = [
    "CATEGORIES",
    "GPTConfig",
    "METHODS",
    "MemoryReport",
    "PRESETS",
    "compare",
    "format_bytes",
    "format_table",
    "memory_report",
    "register_method",
]
