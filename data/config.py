"""DataConfig: which text dataset, where it is prepared, how it is tokenised and batched;
gin-configurable."""

from __future__ import annotations

import dataclasses
import os

import gin

from moe.cache import cache_dir

EMBEDDED = "python_stdlib"  # the embedded corpus: this interpreter's standard-library sources
# array_record: random access (global shuffle, O(1) resume); tfrecord: read as a stream.
FILE_FORMATS = ("array_record", "tfrecord")


def default_data_dir() -> str:
  return cache_dir("tfds")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str = EMBEDDED    # the embedded corpus, or a tfds text dataset: 'c4/en', 'lm1b', ...
  source_dir: str | None = None  # embedded corpus only: read these .py sources, not the stdlib
  data_dir: str | None = None  # None: the cache root's tfds/ (moe.cache; $MOE_CACHE_DIR)
  text_key: str = "text"
  train_split: str = "train"
  eval_split: str = "validation"
  tokenizer_path: str | None = None  # SentencePiece model, tokenizer.json or checkpoint dir; None: train BPE, cached
  vocab_size: int = 8192             # of a trained tokenizer
  tokenizer_lines: int = 300_000     # lines of training text the BPE trainer reads
  seq_len: int = 128
  batch_size: int = 16
  eval_batches: int = 8
  seed: int = 0
  file_format: str = "array_record"  # how a dataset not yet prepared is written (tfrecord: streamed)
  read_threads: int = 4      # threads reading and tokenising documents
  # Packed rows shuffled in windows of this many (train only): a long document's rows
  # would otherwise fill whole batches. Resume re-reads one window. 0: off.
  shuffle_rows: int = 4096
  prefetch_batches: int = 2  # batches prepared while the device runs the step; 0: none

  def __post_init__(self):
    for field in ("vocab_size", "seq_len", "batch_size", "eval_batches", "tokenizer_lines",
                  "read_threads"):
      if getattr(self, field) <= 0:
        raise ValueError(f"DataConfig.{field}={getattr(self, field)!r} must be positive")
    if self.shuffle_rows < 0:
      raise ValueError(f"DataConfig.shuffle_rows={self.shuffle_rows!r} must be >= 0")
    if self.prefetch_batches < 0:
      raise ValueError(f"DataConfig.prefetch_batches={self.prefetch_batches!r} must be >= 0")
    if self.file_format not in FILE_FORMATS:
      raise ValueError(f"DataConfig.file_format={self.file_format!r}: choose from {FILE_FORMATS}")

  @property
  def root(self) -> str:
    return os.path.expanduser(self.data_dir or default_data_dir())
