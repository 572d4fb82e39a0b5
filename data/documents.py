"""Documents: the prepared tfds builder of a DataConfig's dataset and its split's texts,
read either with random access (ArrayRecord files) or as a stream in stored order."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterator, Sequence

from data.config import EMBEDDED, DataConfig
from data.file_lock import file_lock


def source_dir(cfg: DataConfig) -> tuple[str, str] | None:
  """(absolute source_dir, a name for it) when the embedded corpus reads other sources."""
  if not cfg.source_dir:
    return None
  src = os.path.abspath(os.path.expanduser(cfg.source_dir))
  return src, "src_" + hashlib.sha256(src.encode()).hexdigest()[:10]


def dataset_key(cfg: DataConfig) -> str:
  """A file-name-safe id of the dataset (and source dir) for cached tokenizers."""
  source = source_dir(cfg)
  return cfg.dataset.replace("/", "_") + (f"-{source[1]}" if source else "")


def builder(cfg: DataConfig):
  """The prepared tfds builder (the embedded corpus prepares offline). A dataset not yet
  prepared is written in cfg.file_format; one already prepared keeps its format."""
  # Runs started side by side on a fresh cache would each prepare the dataset and all but one
  # fail renaming its output into place; one lock per data root lets the first prepare it
  # and the others find it prepared.
  with file_lock(os.path.join(cfg.root, ".prepare.lock")):
    return _prepared_builder(cfg)


def _prepared_builder(cfg: DataConfig):
  import tensorflow_datasets as tfds  # heavy: import only when data is read

  if cfg.dataset == EMBEDDED:
    from data.stdlib_corpus import PythonStdlib, StdlibConfig
    source = source_dir(cfg)
    config = source and StdlibConfig(name=source[1], source_dir=source[0], version=PythonStdlib.VERSION)
    b = PythonStdlib(data_dir=cfg.root, config=config, file_format=cfg.file_format)
  else:
    if cfg.source_dir:
      raise ValueError(f"DataConfig.source_dir applies to the embedded corpus only, not {cfg.dataset!r}")
    b = tfds.builder(cfg.dataset, data_dir=cfg.root, file_format=cfg.file_format)
  b.download_and_prepare()
  return b


def check_split(dataset: str, split: str, available: list[str]) -> None:
  """A split name the dataset lacks (e.g. 'validation' for lm1b) is an error naming those it
  has. `split` may be a tfds split expression: 'train[:90%]', 'train+test'. A builder that
  lists no splits (tfds's mock data) is not checked."""
  if not available:
    return
  for part in split.split("+"):
    name = part.split("[")[0].strip()
    if name not in available:
      raise ValueError(f"dataset {dataset!r} has no split {name!r}; its splits are {sorted(available)} "
                       f"(set DataConfig.train_split / eval_split)")


def text_of(example: dict[str, Any], cfg: DataConfig) -> str:
  """An example's text feature, decoded; a missing feature is named."""
  if cfg.text_key not in example:
    raise KeyError(f"dataset {cfg.dataset!r} has no feature {cfg.text_key!r}; "
                   f"features: {sorted(example)}; set DataConfig.text_key")
  text = example[cfg.text_key]
  return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


def _is_array_record(b) -> bool:
  return getattr(b.info.file_format, "value", b.info.file_format) == "array_record"


def random_access(cfg: DataConfig, split: str) -> Sequence[dict[str, Any]] | None:
  """The split's examples by index (tfds data source) when the dataset is prepared as
  ArrayRecord; None when it can only be streamed."""
  b = builder(cfg)
  check_split(cfg.dataset, split, list(b.info.splits))
  return b.as_data_source(split=split) if _is_array_record(b) else None


def documents(cfg: DataConfig, split: str) -> Iterator[str]:
  """The split's texts in the dataset's stored order."""
  import tensorflow_datasets as tfds

  b = builder(cfg)
  check_split(cfg.dataset, split, list(b.info.splits))
  if _is_array_record(b):
    source = b.as_data_source(split=split)
    for i in range(len(source)):
      yield text_of(source[i], cfg)
    return
  for ex in tfds.as_numpy(b.as_dataset(split=split, shuffle_files=False)):
    yield text_of(ex, cfg)
