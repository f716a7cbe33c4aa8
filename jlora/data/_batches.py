"""Deterministic batches over tokenized data (moved from ``jlora.finetune.data``, unchanged)."""

from __future__ import annotations

from typing import Any

import numpy as np

from jlora.data._errors import DataError


class Batches:
  """Deterministic batches: the order depends only on (seed, epoch), so any step can be
  recomputed after a restart (the data position *is* the step number).

  ``data`` is a ``TokenizedSFT`` (anything with ``ids``, ``loss_mask``,
  ``attention_mask``, ``segment_ids`` and a length).

  Raises:
    DataError: fewer sequences than one batch, or a batch size that does not split
      over the processes.

  Example:
    >>> import numpy as np
    >>> from jlora.data import Batches, TokenizedSFT
    >>> z = np.zeros((4, 3), np.int32)
    >>> data = TokenizedSFT(ids=z, loss_mask=z.astype(np.float32), attention_mask=z, where=("d",) * 4)
    >>> Batches(data, batch_size=2, grad_accum=1, seed=0).get(0)["ids"].shape
    (1, 2, 3)
  """

  def __init__(self, data: Any, *, batch_size: int, grad_accum: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    self.data = data
    self.global_batch = batch_size * grad_accum
    self.batch_size = batch_size
    self.grad_accum = grad_accum
    self.seed = seed
    self.steps_per_epoch = len(data) // self.global_batch
    if self.steps_per_epoch == 0:
      raise DataError(f"the {len(data)} training sequences are fewer than one batch (--batch-size * "
                      f"--grad-accum = {self.global_batch}); lower --batch-size or --grad-accum, or add data")
    if batch_size % process_count:
      raise DataError(f"--batch-size {batch_size} does not split over {process_count} processes; use a "
                      "multiple of the process count")
    self.process_index = process_index
    self.process_count = process_count

  def indices(self, step: int) -> np.ndarray:
    """This process's rows of step ``step``: shape ``(grad_accum, batch_size // process_count)``.

    Micro-batch ``m`` of the global batch is the same set of rows for any number
    of processes; process ``p`` holds its ``p``-th contiguous part.
    """
    epoch, i = divmod(step, self.steps_per_epoch)
    perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
    idx = perm[i * self.global_batch:(i + 1) * self.global_batch].reshape(self.grad_accum, self.batch_size)
    per = self.batch_size // self.process_count
    return idx[:, self.process_index * per:(self.process_index + 1) * per]

  def get(self, step: int) -> dict[str, np.ndarray]:
    """This process's part of step ``step``'s batch, shaped ``(grad_accum, rows, max_len)``."""
    idx = self.indices(step)
    batch = {
        "ids": self.data.ids[idx],
        "loss_mask": self.data.loss_mask[idx],
        "attention_mask": self.data.attention_mask[idx],
    }
    if self.data.segment_ids is not None:
      batch["segment_ids"] = self.data.segment_ids[idx]
    return batch
