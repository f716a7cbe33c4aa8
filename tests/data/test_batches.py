"""Deterministic batches (jlora.data._batches), unchanged from jlora.finetune.data."""

import numpy as np
import pytest

from jlora.data import Batches, DataError, TokenizedSFT


def data(n, max_len=4, packed=False):
  ids = np.arange(n * max_len, dtype=np.int32).reshape(n, max_len)
  seg = np.ones_like(ids) if packed else None
  return TokenizedSFT(ids=ids, loss_mask=np.ones(ids.shape, np.float32), attention_mask=np.ones_like(ids),
                      where=tuple(f"d.jsonl:{i}" for i in range(n)), segment_ids=seg)


def test_batches_are_deterministic_and_cover_each_epoch():
  t = data(10)
  b = Batches(t, batch_size=2, grad_accum=2, seed=3)
  assert b.steps_per_epoch == 2
  assert b.get(1)["ids"].shape == (2, 2, 4) and "segment_ids" not in b.get(1)
  np.testing.assert_array_equal(b.indices(3), Batches(t, batch_size=2, grad_accum=2, seed=3).indices(3))
  epoch0 = np.concatenate([b.indices(0), b.indices(1)]).reshape(-1)
  assert len(set(epoch0.tolist())) == 8
  assert not np.array_equal(b.indices(0), b.indices(2))  # reshuffled next epoch
  # Two processes hold the two halves of every micro-batch of the one-process batch.
  halves = [Batches(t, batch_size=2, grad_accum=2, seed=3, process_index=i, process_count=2).indices(5)
            for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves, axis=1), b.indices(5))
  assert Batches(data(2, packed=True), batch_size=1, grad_accum=1, seed=0).get(0)["segment_ids"].shape == (1, 1, 4)


def test_batch_errors():
  with pytest.raises(DataError, match="--batch-size 3 does not split over 2 processes"):
    Batches(data(10), batch_size=3, grad_accum=1, seed=0, process_count=2)
  with pytest.raises(DataError, match=r"the 10 training sequences are fewer than one batch .*; lower --batch-size"):
    Batches(data(10), batch_size=8, grad_accum=2, seed=0)
