"""Many scoring and generation requests in a few compiled shapes (lm-eval's adapter,
moe.train.harness): a row goes to the smallest of a few lengths (powers of two up to the
model's max length) and each length has one batch size, so a task compiles at most one
scoring program, or one Decoder, per length, whatever its number of requests.

    scorer = BucketedScorer(lm, max_len=4096)      # lm: moe.train.lm_eval.LM
    logprob, greedy = scorer.score(rows)           # rows: (ids [n + 1], weights [n]), n <= max_len
    gen = BucketedGenerator(graphdef, params, mesh, max_len=4096)
    new_ids = gen.generate(prompts, max_new=256, sampling=Sampling(), eos_id=1)

A batch of length L holds about `rows_at_max * max_len` tokens (short rows in bigger
batches), at most `max_rows` rows, rounded up to split over the mesh's batch axes.
`shapes` holds every (batch, length) used (the programs compiled), `last` those of the
latest call.
"""

from __future__ import annotations

import bisect
import collections
from typing import Sequence

import numpy as np
from jax.sharding import Mesh

from moe.decode.generate import Decoder
from moe.decode.sampling import Sampling
from moe.train.lm_eval import LM, batch_rows, score_rows

SMALLEST = 16  # the shortest bucket: rows shorter than this are padded to it


def length_buckets(max_len: int, smallest: int = SMALLEST) -> tuple[int, ...]:
  """Powers of two from `smallest` below max_len, then max_len: (16, 32, 64, 100) for 100."""
  out, n = [], smallest
  while n < max_len:
    out.append(n)
    n *= 2
  return tuple(out) + (max_len,)


def bucket_of(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket holding n tokens."""
  i = bisect.bisect_left(buckets, n)
  if i == len(buckets):
    raise ValueError(f"{n} tokens exceed the longest bucket, {buckets[-1]}")
  return buckets[i]


def rows_per_batch(length: int, max_len: int, rows_at_max: int, mesh: Mesh | None,
                   max_rows: int | None = None) -> int:
  """Rows of a batch of `length`: rows_at_max * max_len tokens' worth, at most max_rows,
  rounded up to split over the mesh's batch axes."""
  b = max(1, rows_at_max * max_len // length)
  b = min(b, max_rows) if max_rows else b
  k = batch_rows(mesh)
  return -(-b // k) * k


class BucketedScorer:
  """moe.train.lm_eval.score_rows over length buckets."""

  def __init__(self, lm: LM, max_len: int, rows_at_max: int = 1, max_rows: int | None = None,
               smallest: int = SMALLEST):
    self.lm, self.max_len = lm, max_len
    self.buckets = length_buckets(max_len, min(smallest, max_len))
    self.batch = {n: rows_per_batch(n, max_len, rows_at_max, lm.mesh, max_rows) for n in self.buckets}
    self.shapes: set[tuple[int, int]] = set()
    self.last: set[tuple[int, int]] = set()

  def score(self, rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """-> (summed weighted log-probs [R] f64, all weighted targets the argmax [R] bool), in
    the rows' order."""
    by_length = collections.defaultdict(list)
    for i, (ids, _) in enumerate(rows):
      by_length[bucket_of(len(ids) - 1, self.buckets)].append(i)
    logprob, greedy = np.zeros(len(rows), np.float64), np.zeros(len(rows), bool)
    self.last = {(self.batch[n], n) for n in by_length}
    self.shapes |= self.last
    for n, idx in sorted(by_length.items()):
      lp, _, _, top = score_rows(self.lm, [rows[i] for i in idx], n, self.batch[n], with_greedy=True)
      logprob[idx], greedy[idx] = lp, top
    return logprob, greedy


class BucketedGenerator:
  """moe.decode's Decoder per (batch, length) bucket of prompt + new tokens, kept: prompts of
  any lengths and any number of new tokens reuse a few compiled decoders."""

  def __init__(self, graphdef, params, mesh: Mesh | None, max_len: int, rows_at_max: int = 1,
               max_rows: int | None = None, smallest: int = SMALLEST):
    self.graphdef, self.params, self.mesh, self.max_len = graphdef, params, mesh, max_len
    self.buckets = length_buckets(max_len, min(smallest, max_len))
    self.batch = {n: rows_per_batch(n, max_len, rows_at_max, mesh, max_rows) for n in self.buckets}
    self.decoders: dict[tuple[int, int], Decoder] = {}
    self.last: set[tuple[int, int]] = set()

  @property
  def shapes(self) -> set[tuple[int, int]]:
    return set(self.decoders)

  def decoder(self, length: int) -> Decoder:
    key = (self.batch[length], length)
    if key not in self.decoders:
      self.decoders[key] = Decoder(self.graphdef, self.params, key[0], length, self.mesh)
    return self.decoders[key]

  def generate(self, prompts: Sequence[Sequence[int]], max_new: int, sampling: Sampling = Sampling(),
               eos_id: int | None = None, seed: int = 0) -> list[np.ndarray]:
    """New ids per prompt (up to max_new, or to and including EOS), in the prompts' order.
    A prompt longer than max_len - max_new keeps its last tokens (lm-eval's left truncation)."""
    if not 1 <= max_new < self.max_len:
      raise ValueError(f"max_new={max_new} new tokens: need 1 to max_len - 1 = {self.max_len - 1}")
    prompts = [list(p)[-(self.max_len - max_new):] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    by_length = collections.defaultdict(list)
    for i in order:
      by_length[bucket_of(len(prompts[i]) + max_new, self.buckets)].append(i)
    out: list[np.ndarray] = [np.zeros(0, np.int32)] * len(prompts)
    self.last = {(self.batch[n], n) for n in by_length}
    for n, idx in sorted(by_length.items()):
      dec = self.decoder(n)
      for start in range(0, len(idx), dec.batch):
        chunk = idx[start:start + dec.batch]
        gen = dec.generate([prompts[i] for i in chunk], max_new, sampling, seed + start, eos_id)
        for i, tokens in zip(chunk, gen.tokens):
          out[i] = tokens
    return out
