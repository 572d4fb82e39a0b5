"""SentencePiece BPE tokenizer: trained on the training split at prepare time, cached.

Whitespace is kept as is (code needs its indentation); characters outside the learned
pieces, newlines included, fall back to bytes, so every string round-trips.
"""

from __future__ import annotations

import io
import os
from typing import Iterable

import numpy as np
import sentencepiece as spm

EOS_ID = 2  # SentencePiece's default ids: 0 unk, 1 bos, 2 eos; no pad (we pad with 0 and mask it)


class Tokenizer:
  """A SentencePiece model; one implementation of data.text_tokenizer.TextTokenizer."""

  # Our runs pack documents with EOS between them and never see BOS, so text scored or
  # prompted for them starts without it.
  add_bos = False

  def __init__(self, model_path: str):
    if not os.path.exists(model_path):
      raise FileNotFoundError(f"tokenizer model {model_path!r} does not exist")
    self.path = model_path
    self.sp = spm.SentencePieceProcessor(model_file=model_path)
    self.eos_id = self.sp.eos_id()
    if self.eos_id < 0:
      raise ValueError(f"tokenizer {model_path!r} defines no EOS id; train it with eos_id >= 0")

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  @property
  def bos_id(self) -> int | None:
    return self.sp.bos_id() if self.sp.bos_id() >= 0 else None

  @property
  def pad_id(self) -> int | None:
    return self.sp.pad_id() if self.sp.pad_id() >= 0 else None

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])


def train_tokenizer(texts: Iterable[str], model_path: str, vocab_size: int = 8192,
                    max_lines: int = 300_000) -> Tokenizer:
  """Train BPE on the non-empty lines of `texts` (at most max_lines) -> Tokenizer at model_path."""
  def lines():
    n = 0
    for text in texts:
      for line in text.splitlines():
        if line.strip():
          yield line
          n += 1
          if n >= max_lines:
            return

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=lines(), model_writer=model, model_type="bpe", vocab_size=vocab_size,
      byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
      split_digits=True, allow_whitespace_only_pieces=True, max_sentence_length=16384,
      character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=EOS_ID, pad_id=-1,
      num_threads=os.cpu_count() or 1, minloglevel=2)
  os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
  tmp = model_path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, model_path)  # never leave a half-written model behind
  return Tokenizer(model_path)


def check_token_ids(ids: np.ndarray, vocab_size: int, what: str = "token ids") -> None:
  """Raise if any id falls outside [0, vocab_size): a silent clip would train on garbage."""
  ids = np.asarray(ids)
  if ids.size == 0:
    return
  bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"{what}: {bad.size} id(s) outside the model's vocab [0, {vocab_size}), "
                     f"first {int(ids.flat[i])} at flat index {i}; the tokenizer and "
                     f"ModelConfig.vocab_size disagree")
