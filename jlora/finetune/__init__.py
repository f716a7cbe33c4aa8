"""Fine-tune a causal language model with LoRA: ``python -m jlora.finetune``.

Example:
  >>> from jlora.finetune import TrainConfig
  >>> TrainConfig().targets
  'all-linear'
"""

from jlora.finetune.config import TrainConfig
from jlora.finetune.train import run

__all__ = ["TrainConfig", "run"]
