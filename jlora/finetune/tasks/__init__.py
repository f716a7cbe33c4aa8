"""Training objectives of ``jlora-finetune`` (``--task``): each a ``Task`` owning data, batches, loss, metrics.

To add an objective: subclass ``Task`` (``tasks/base.py`` says what the loop asks of it),
register it in ``TASKS`` below and add its name to ``jlora.finetune.config.TASKS``.

Example:
  >>> from jlora.finetune.tasks import TASKS
  >>> sorted(TASKS)
  ['dpo', 'grpo', 'kto', 'orpo', 'sft', 'simpo']
"""

from jlora.finetune.tasks.base import Task, TaskContext
from jlora.finetune.tasks.grpo import GRPO
from jlora.finetune.tasks.preference import DPO, KTO, ORPO, SimPO
from jlora.finetune.tasks.sft import SFT

TASKS: dict[str, type[Task]] = {t.name: t for t in (SFT, DPO, SimPO, ORPO, KTO, GRPO)}

__all__ = ["DPO", "GRPO", "KTO", "ORPO", "SFT", "SimPO", "TASKS", "Task", "TaskContext"]
