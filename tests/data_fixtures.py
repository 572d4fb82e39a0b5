"""A small local corpus and configs for pipeline and training tests (no network)."""

import os
import shutil

from data.config import DataConfig
from data.stdlib_corpus import source_files, split_of, stdlib_dir
from moe.model.presets import get_preset

N_TRAIN, N_VALID = 40, 6


def make_corpus(root: str) -> str:
  """Copies a fixed set of stdlib modules: N_TRAIN that hash to train, N_VALID to validation."""
  src = stdlib_dir()
  picked = {"train": [], "validation": []}
  for rel in source_files(src):
    split = split_of(rel)
    want = N_TRAIN if split == "train" else N_VALID
    size = os.path.getsize(os.path.join(src, rel))
    if len(picked[split]) < want and 2_000 < size < 40_000:
      picked[split].append(rel)
  for rel in picked["train"] + picked["validation"]:
    os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
    shutil.copy(os.path.join(src, rel), os.path.join(root, rel))
  return root


def small_data_config(corpus, **kw) -> DataConfig:
  """corpus: the (source_dir, data_dir) of the small_corpus fixture."""
  source_dir, data_dir = corpus
  return DataConfig(**{**dict(source_dir=source_dir, data_dir=data_dir, vocab_size=512,
                               seq_len=64, batch_size=8, eval_batches=2), **kw})


def small_model(**kw):
  return get_preset("tiny_deepseekmoe").replace(**{**dict(
      vocab_size=512, d_model=64, n_layers=2, n_heads=4, dense_ffn_width=192, expert_width=48,
      max_seq_len=64), **kw})
