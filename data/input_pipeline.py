"""Input pipeline on grain: tfds documents -> token ids -> packed rows -> batches.

    source (ArrayRecord, random access)  ->  seeded global shuffle per epoch, repeat
      -> this host's documents (every process_count-th)  ->  tokenise (read_threads)
      -> pack (concat-then-split)  ->  shuffle rows in windows (shuffle_rows)
      -> batch of this host's rows  ->  prefetch

Evaluation batches are the first eval_batches of the eval split packed in one fixed shuffled
document order (EVAL_SEED): spread over the whole split, identical for every run. Each host
packs its own documents, so hosts may pack different numbers of them; the hosts then agree
on the most and the others add padding batches (moe.train.evaluate.agree_eval_batches).

Batches are dicts of [batch / hosts, seq_len] arrays: inputs, targets, weights,
segment_ids, positions. The train iterator is a grain DatasetIterator: its state (a few
integers) is saved in each checkpoint and restored in a time that does not grow with the
step (it re-reads one row-shuffle window), so a resumed run sees exactly the batches it
would have seen. A dataset prepared as TFRecord is read as a stream
(data.stream): the same batches, in stored order, but resuming re-reads the stream.
"""

from __future__ import annotations

import os
from typing import Iterator, NamedTuple

import grain
import numpy as np
from grain.experimental import ThreadPrefetchIterDataset, WindowShuffleIterDataset

from data import packing
from data.config import DataConfig
from data.documents import dataset_key, documents, random_access, text_of
from data.file_lock import file_lock
from data.stream import StreamDataset
from data.text_tokenizer import TextTokenizer, load_tokenizer
from data.tokenizer import check_token_ids, train_tokenizer

Batch = dict[str, np.ndarray]
ENTROPY_TOKENS = 1 << 20  # tokens of the train split behind the unigram-entropy reference


def trained_tokenizer_path(cfg: DataConfig) -> str:
  """Where the BPE model trained for this dataset (no DataConfig.tokenizer_path) is cached."""
  return os.path.join(cfg.root, "tokenizers", f"{dataset_key(cfg)}-bpe{cfg.vocab_size}.model")


def tokenizer_for(cfg: DataConfig) -> TextTokenizer:
  """Load DataConfig.tokenizer_path (a SentencePiece model, a tokenizer.json, or a checkpoint
  directory: data.text_tokenizer.load_tokenizer), or train BPE on the train split once and
  cache it."""
  if cfg.tokenizer_path:
    return load_tokenizer(cfg.tokenizer_path)
  path = trained_tokenizer_path(cfg)
  # Runs started together on a fresh cache: the first trains it, the others then load it.
  with file_lock(path + ".lock"):
    if os.path.exists(path):
      return load_tokenizer(path)
    return train_tokenizer(documents(cfg, cfg.train_split), path, cfg.vocab_size, cfg.tokenizer_lines)


def to_batch(tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray) -> Batch:
  targets, weights = packing.lm_example(tokens, segment_ids)
  return {"inputs": tokens, "targets": targets, "weights": weights,
          "segment_ids": segment_ids, "positions": positions}


def padding_batch(rows: int, seq_len: int) -> Batch:
  """Rows of padding only (segment id 0): every weight is 0, so the batch adds nothing to a
  loss sum or a token count."""
  zeros = np.zeros((rows, seq_len), np.int32)
  return to_batch(zeros, zeros.copy(), zeros.copy())


EVAL_SEED = 0


def random_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> Batch:
  """Uniform random tokens, one document per row: for benchmarks and tests."""
  tokens = np.random.default_rng(seed).integers(0, vocab_size, (batch_size, seq_len)).astype(np.int32)
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape).copy()
  return to_batch(tokens, np.ones_like(tokens), positions)


def host_batch_size(batch_size: int, shard_count: int) -> int:
  """Rows of every global batch that each host reads."""
  if batch_size % shard_count:
    raise ValueError(f"batch_size={batch_size} does not split over {shard_count} hosts")
  return batch_size // shard_count


def tokenized_documents(cfg: DataConfig, tok: TextTokenizer, split: str, *, shuffle: bool,
                        repeat: bool, shard_index: int = 0, shard_count: int = 1,
                        seed: int | None = None) -> grain.IterDataset:
  """This host's documents of `split` as {'tokens': [n] int32}, EOS appended. shuffle: a
  global shuffle seeded by `seed` (default cfg.seed), different every epoch (a stream keeps
  its order); repeat: epochs without end."""
  def encode(text: str) -> dict[str, np.ndarray]:
    return {"tokens": np.append(tok.encode(text), np.int32(tok.eos_id)).astype(np.int32)}

  source = random_access(cfg, split)
  if source is None:  # a stream: read in this (prefetch) thread, in stored order
    docs = StreamDataset(lambda: documents(cfg, split), shard_index, shard_count, repeat)
    return ThreadPrefetchIterDataset(docs.map(encode), prefetch_buffer_size=16 * cfg.read_threads)
  if not len(source):
    raise ValueError(f"split {split!r} of {cfg.dataset!r} has no documents")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=cfg.seed if seed is None else seed)
  if repeat:
    ds = ds.repeat()
  ds = ds[shard_index::shard_count].map(lambda example: encode(text_of(example, cfg)))
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=16 * cfg.read_threads))


def batches(cfg: DataConfig, tok: TextTokenizer, split: str, model_vocab_size: int, *, train: bool,
            shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """This host's batches of `split` (see the module docstring)."""
  rows = host_batch_size(cfg.batch_size, shard_count)
  # Evaluation reads documents in one fixed shuffled order, whatever the run's seed: its
  # first batches come from all over the split (every file), the same for every run.
  docs = tokenized_documents(cfg, tok, split, shuffle=True, repeat=train, shard_index=shard_index,
                             shard_count=shard_count, seed=None if train else EVAL_SEED)

  def batch(r) -> Batch:
    check_token_ids(r["tokens"], model_vocab_size, f"{cfg.dataset} {split}")
    return to_batch(r["tokens"], r["segment_ids"], r["positions"])

  ds = packing.pack(docs, cfg.seq_len)
  if train and cfg.shuffle_rows > 1:
    ds = WindowShuffleIterDataset(ds, window_size=cfg.shuffle_rows, seed=cfg.seed)
  ds = ds.batch(rows, drop_remainder=True).map(batch)
  if not cfg.prefetch_batches:
    return ds
  return ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch_batches)


class Datasets(NamedTuple):
  train: grain.DatasetIterator  # this host's train batches; get_state/set_state resume it
  eval_batches: list[Batch]
  tokenizer: TextTokenizer
  unigram_entropy: float  # nats per token of the training tokens' unigram distribution


def check_eval_batches(count: int, cfg: DataConfig) -> None:
  """Refuse an eval split that packs into no batch at all (on any host)."""
  if not count:
    raise ValueError(f"split {cfg.eval_split!r} of {cfg.dataset!r} holds less than one batch "
                     f"({cfg.batch_size} rows of {cfg.seq_len} tokens)")


def unigram_entropy(docs: Iterator[dict[str, np.ndarray]], max_tokens: int = ENTROPY_TOKENS) -> float:
  """Entropy of the unigram distribution of the first max_tokens tokens of docs."""
  counts, seen = np.zeros(0, np.int64), 0
  for doc in docs:
    c = np.bincount(doc["tokens"])
    counts = np.pad(counts, (0, max(0, len(c) - len(counts))))
    counts[:len(c)] += c
    seen += len(doc["tokens"])
    if seen >= max_tokens:
      break
  p = counts[counts > 0] / max(counts.sum(), 1)
  return float(-np.sum(p * np.log(p)))


def make_datasets(cfg: DataConfig, model_vocab_size: int, shard_index: int = 0,
                  shard_count: int = 1) -> Datasets:
  """Train iterator, fixed eval batches and the tokenizer, checked against the model vocab.
  With several shards this shard's eval batches may be none: the hosts agree on the count
  (moe.train.evaluate.agree_eval_batches), which refuses a split that fills no host's batch."""
  tok = tokenizer_for(cfg)
  if tok.vocab_size > model_vocab_size:
    raise ValueError(f"tokenizer {tok.path!r} has {tok.vocab_size} pieces but "
                     f"ModelConfig.vocab_size={model_vocab_size}; ids would fall outside the "
                     f"embedding. Set the model's vocab_size to at least {tok.vocab_size}")
  args = dict(shard_index=shard_index, shard_count=shard_count)
  train = iter(batches(cfg, tok, cfg.train_split, model_vocab_size, train=True, **args))
  eval_it = iter(batches(cfg, tok, cfg.eval_split, model_vocab_size, train=False, **args))
  eval_batches = [b for b, _ in zip(eval_it, range(cfg.eval_batches))]
  eval_it.close()
  if shard_count == 1:
    check_eval_batches(len(eval_batches), cfg)
  # One epoch's first documents in the shuffled order all hosts share.
  sample = iter(tokenized_documents(cfg, tok, cfg.train_split, shuffle=True, repeat=False))
  entropy = unigram_entropy(sample)
  sample.close()
  return Datasets(train, eval_batches, tok, entropy)
