"""Training objectives of ``jlora-finetune`` (``--task``): each a ``Task`` owning data, batches, loss, metrics.

To add an objective: subclass ``Task`` (``tasks/base.py`` says what the loop asks of it),
register it in ``TASKS`` below and add its name to ``jlora.finetune.config.TASKS``.

Example:
  >>> from jlora.finetune.tasks import TASKS
  >>> sorted(TASKS)
  ['sft']
"""

from jlora.finetune.tasks.base import Task, TaskContext
from jlora.finetune.tasks.sft import SFT

TASKS: dict[str, type[Task]] = {SFT.name: SFT}

__all__ = ["SFT", "TASKS", "Task", "TaskContext"]
