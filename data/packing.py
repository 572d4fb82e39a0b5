"""Packing documents into fixed-length rows with segment ids and positions.

The documents, each followed by EOS, are concatenated and cut into rows of seq_len
tokens (grain's concat-then-split): no padding except after the last document, no token
lost or duplicated. A segment is the part of one document inside one row (ids 1, 2, ...
within a row, 0 for padding); positions count from 0 in each segment.
"""

from __future__ import annotations

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset


def pack(docs: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """docs: {'tokens': [n] int32} -> rows {'tokens', 'segment_ids', 'positions'}: [seq_len]
  int32, in order. The iterator's state is the parent's plus the unfinished document."""
  rows = _JsonRestorable(ConcatThenSplitIterDataset(docs, length_struct={"tokens": seq_len}))
  return rows.map(lambda r: {"tokens": r["tokens"], "segment_ids": r["tokens_segment_ids"],
                             "positions": r["tokens_positions"]})


class _JsonRestorable(grain.IterDataset):
  """Concat-then-split whose state survives JSON (checkpoints): grain compares the saved
  slices with the tuple (-1, -1) for "no unfinished document", and JSON turns them into
  lists, so a restored iterator would invent one."""

  def __iter__(self):
    return _JsonRestorableIterator(self._parent.__iter__())


class _JsonRestorableIterator(grain.DatasetIterator):
  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
    self._parent.set_state(dict(state, remainder_slices=slices))


def lm_example(tokens: np.ndarray, segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[..., S] rows -> (targets, weights): the next token where it is in the same segment."""
  targets = np.zeros_like(tokens)
  targets[..., :-1] = tokens[..., 1:]
  weights = np.zeros(tokens.shape, np.float32)
  weights[..., :-1] = (segment_ids[..., 1:] == segment_ids[..., :-1]) & (segment_ids[..., :-1] > 0)
  return targets, weights
