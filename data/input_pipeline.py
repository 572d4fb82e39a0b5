"""Input pipeline: tfds documents -> SentencePiece ids -> packed rows -> resumable batches.

Batches are dicts of [batch, seq_len] arrays: inputs, targets, weights, segment_ids,
positions. Iterators carry a small state (`get_state`/`set_state`) that checkpoints
store, so a restarted run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from data import packing
from data.config import EMBEDDED, DataConfig
from data.documents import dataset_key, documents
from data.tokenizer import Tokenizer, check_token_ids, train_tokenizer

Batch = dict[str, np.ndarray]


def tokenizer_for(cfg: DataConfig) -> Tokenizer:
  """Load DataConfig.tokenizer_path, or train BPE on the train split once and cache it."""
  if cfg.tokenizer_path:
    return Tokenizer(os.path.expanduser(cfg.tokenizer_path))
  path = os.path.join(cfg.root, "tokenizers", f"{dataset_key(cfg)}-bpe{cfg.vocab_size}.model")
  if os.path.exists(path):
    return Tokenizer(path)
  return train_tokenizer(documents(cfg, cfg.train_split), path, cfg.vocab_size, cfg.tokenizer_lines)


# ---------------------------------------------------------------------------------------
# Packed rows and batches.

class Rows(NamedTuple):
  tokens: np.ndarray       # [N, seq_len]
  segment_ids: np.ndarray  # [N, seq_len]
  positions: np.ndarray    # [N, seq_len]


def packed_stream(cfg: DataConfig, tok: Tokenizer, split: str) -> Iterator[packing.Packed]:
  return packing.pack((tok.encode(t) for t in documents(cfg, split)), cfg.seq_len, tok.eos_id)


def materialized_rows(cfg: DataConfig, tok: Tokenizer, split: str) -> Rows:
  """All packed rows of a split, cached as .npz keyed by the tokenizer's bytes and seq_len."""
  with open(tok.path, "rb") as f:
    tok_hash = hashlib.sha256(f.read()).hexdigest()[:12]
  path = os.path.join(cfg.root, "packed", f"{dataset_key(cfg)}-{split}-{tok_hash}-s{cfg.seq_len}.npz")
  if os.path.exists(path):
    with np.load(path) as z:
      return Rows(z["tokens"], z["segment_ids"], z["positions"])
  packed = list(packed_stream(cfg, tok, split))
  if not packed:
    raise ValueError(f"split {split!r} of {cfg.dataset!r} has no text to train on")
  rows = Rows(*(np.stack(col) for col in zip(*packed)))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **rows._asdict())
  os.replace(tmp, path)
  return rows


def to_batch(tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray) -> Batch:
  targets, weights = packing.lm_example(tokens, segment_ids)
  return {"inputs": tokens, "targets": targets, "weights": weights,
          "segment_ids": segment_ids, "positions": positions}


def random_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> Batch:
  """Uniform random tokens, one document per row: for benchmarks and tests."""
  tokens = np.random.default_rng(seed).integers(0, vocab_size, (batch_size, seq_len)).astype(np.int32)
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape).copy()
  return to_batch(tokens, np.ones_like(tokens), positions)


def host_slice(batch_size: int, shard_index: int, shard_count: int) -> slice:
  """This host's contiguous rows of every global batch."""
  if batch_size % shard_count:
    raise ValueError(f"batch_size={batch_size} does not split over {shard_count} hosts")
  per_host = batch_size // shard_count
  return slice(shard_index * per_host, (shard_index + 1) * per_host)


class ArrayBatches:
  """Batches from rows held in memory; batch n is a pure function of (seed, n).

  Each epoch visits the rows in a fresh seeded permutation. With shard_count hosts, each
  takes its contiguous slice of every global batch.
  """

  def __init__(self, rows: Rows, batch_size: int, seed: int, shuffle: bool = True,
               shard_index: int = 0, shard_count: int = 1):
    self.rows, self.batch_size, self.seed, self.shuffle = rows, batch_size, seed, shuffle
    self.local = host_slice(batch_size, shard_index, shard_count)
    self.step = 0
    self._perm: tuple[int, np.ndarray] | None = None

  def _order(self, epoch: int) -> np.ndarray:
    n = len(self.rows.tokens)
    if not self.shuffle:
      return np.arange(n)
    if self._perm is None or self._perm[0] != epoch:
      self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
    return self._perm[1]

  def batch(self, n: int) -> Batch:
    g = n * self.batch_size + np.arange(self.batch_size)[self.local]
    count = len(self.rows.tokens)
    idx = np.array([self._order(int(e))[p] for e, p in zip(g // count, g % count)])
    return to_batch(*(a[idx] for a in self.rows))

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    b = self.batch(self.step)
    self.step += 1
    return b

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step}

  def set_state(self, state: dict[str, Any]) -> None:
    self.step = int(state["step"])


class StreamBatches:
  """Batches read in order from a dataset too large to hold; repeats at the end.

  Resuming re-reads the stream and skips the batches already served.
  """

  def __init__(self, make_rows: Callable[[], Iterator[packing.Packed]], batch_size: int,
               shard_index: int = 0, shard_count: int = 1):
    self.make_rows, self.batch_size = make_rows, batch_size
    self.local = host_slice(batch_size, shard_index, shard_count)
    self.step = 0
    self._it = self._batches()

  def _batches(self) -> Iterator[Batch]:
    while True:
      buf, empty = [], True
      for row in self.make_rows():
        empty = False
        buf.append(row)
        if len(buf) == self.batch_size:
          yield to_batch(*(np.stack(col)[self.local] for col in zip(*buf)))
          buf = []
      if empty:
        raise ValueError("the dataset yielded no text")

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    self.step += 1
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step}

  def set_state(self, state: dict[str, Any]) -> None:
    self.step, self._it = 0, self._batches()
    for _ in range(int(state["step"])):
      next(self)


class Datasets(NamedTuple):
  train: ArrayBatches | StreamBatches
  eval_batches: list[Batch]
  tokenizer: Tokenizer
  unigram_entropy: float  # nats per token of the training tokens' unigram distribution


def unigram_entropy(tokens: np.ndarray, mask: np.ndarray) -> float:
  counts = np.bincount(tokens[mask > 0].ravel())
  p = counts[counts > 0] / counts.sum()
  return float(-np.sum(p * np.log(p)))


def make_datasets(cfg: DataConfig, model_vocab_size: int, shard_index: int = 0,
                  shard_count: int = 1) -> Datasets:
  """Train iterator, fixed eval batches and the tokenizer, checked against the model vocab."""
  tok = tokenizer_for(cfg)
  if tok.vocab_size > model_vocab_size:
    raise ValueError(f"tokenizer {tok.path!r} has {tok.vocab_size} pieces but "
                     f"ModelConfig.vocab_size={model_vocab_size}; ids would fall outside the "
                     f"embedding. Set the model's vocab_size to at least {tok.vocab_size}")
  materialize = cfg.dataset == EMBEDDED if cfg.materialize is None else cfg.materialize
  if materialize:
    rows = materialized_rows(cfg, tok, cfg.train_split)
    check_token_ids(rows.tokens, model_vocab_size, f"{cfg.dataset} {cfg.train_split}")
    train = ArrayBatches(rows, cfg.batch_size, cfg.seed, True, shard_index, shard_count)
    entropy = unigram_entropy(rows.tokens, rows.segment_ids)
    eval_rows = materialized_rows(cfg, tok, cfg.eval_split)
    evals = ArrayBatches(eval_rows, cfg.batch_size, cfg.seed, False, shard_index, shard_count)
    n_eval = min(cfg.eval_batches, max(1, len(eval_rows.tokens) // cfg.batch_size))
  else:
    train = StreamBatches(lambda: packed_stream(cfg, tok, cfg.train_split), cfg.batch_size,
                          shard_index, shard_count)
    evals = StreamBatches(lambda: packed_stream(cfg, tok, cfg.eval_split), cfg.batch_size,
                          shard_index, shard_count)
    n_eval = cfg.eval_batches
    first = StreamBatches(lambda: packed_stream(cfg, tok, cfg.train_split), cfg.batch_size)
    sample = [next(first) for _ in range(cfg.eval_batches)]
    entropy = unigram_entropy(np.concatenate([b["inputs"] for b in sample]),
                              np.concatenate([b["segment_ids"] for b in sample]))
  eval_batches = [next(evals) for _ in range(n_eval)]
  for b in eval_batches:
    check_token_ids(b["inputs"], model_vocab_size, f"{cfg.dataset} {cfg.eval_split}")
  return Datasets(train, eval_batches, tok, entropy)
