"""Packing documents into fixed-length rows with segment ids and positions.

The documents, each followed by EOS, are concatenated and cut into rows of seq_len
tokens: no padding except after the last document, no token lost or duplicated. A segment
is the part of one document inside one row (ids 1, 2, ... within a row, 0 for padding);
positions count from 0 in each segment.
"""

from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple

import numpy as np


class Packed(NamedTuple):
  tokens: np.ndarray       # [seq_len] int32, 0 where padded
  segment_ids: np.ndarray  # [seq_len] int32, 0 where padded
  positions: np.ndarray    # [seq_len] int32


def pack(docs: Iterable[np.ndarray], seq_len: int, eos_id: int) -> Iterator[Packed]:
  """docs: token arrays -> rows of seq_len tokens, in order."""
  tokens = np.zeros(seq_len, np.int32)
  segs = np.zeros(seq_len, np.int32)
  pos = np.zeros(seq_len, np.int32)
  fill, seg = 0, 0
  for doc in docs:
    doc = np.append(np.asarray(doc, np.int32), np.int32(eos_id))
    start = 0
    while start < len(doc):
      take = min(seq_len - fill, len(doc) - start)
      seg += 1
      tokens[fill:fill + take] = doc[start:start + take]
      segs[fill:fill + take] = seg
      pos[fill:fill + take] = np.arange(take)
      fill, start = fill + take, start + take
      if fill == seq_len:
        yield Packed(tokens.copy(), segs.copy(), pos.copy())
        tokens[:], segs[:], pos[:] = 0, 0, 0
        fill, seg = 0, 0
  if fill:
    yield Packed(tokens, segs, pos)


def lm_example(tokens: np.ndarray, segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[..., S] rows -> (targets, weights): the next token where it is in the same segment."""
  targets = np.zeros_like(tokens)
  targets[..., :-1] = tokens[..., 1:]
  weights = np.zeros(tokens.shape, np.float32)
  weights[..., :-1] = (segment_ids[..., 1:] == segment_ids[..., :-1]) & (segment_ids[..., :-1] > 0)
  return targets, weights
