"""Fine-tune a causal language model with LoRA: ``jlora-finetune`` / ``python -m jlora.finetune``.

``run(cfg)`` runs the three stages of ``train.py`` (setup, loop, finish) around a task
(``jlora.finetune.tasks``: SFT; new objectives plug in there). ``UserError`` is what
``run`` raises for bad input (data, model directory, targets, output directory); the
command prints it as one line and exits with status 2.

Example:
  >>> from jlora.finetune import TrainConfig
  >>> TrainConfig().targets
  'all-linear'
"""

from jlora.finetune.cli import UserError
from jlora.finetune.config import TrainConfig
from jlora.finetune.train import run

__all__ = ["TrainConfig", "UserError", "run"]
