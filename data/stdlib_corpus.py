"""A tfds builder for a corpus every machine has offline: the Python standard library.

Each example is one `.py` file of the running interpreter's stdlib (code, docstrings and
comments), minus the test suites and site-packages. Files go to train or validation by a
hash of their relative path, so the split never changes between machines. The interpreter
version is recorded in the dataset's metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import sysconfig

import tensorflow_datasets as tfds

VALIDATION_PERCENT = 5
_SKIP_DIRS = {"site-packages", "test", "tests", "__pycache__", "idle_test"}


def stdlib_dir() -> str:
  return sysconfig.get_paths()["stdlib"]


def source_files(root: str) -> list[str]:
  """Relative paths of the corpus's .py files under root, sorted."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    out.extend(os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py"))
  return sorted(out)


def split_of(relpath: str) -> str:
  bucket = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:4], "little") % 100
  return "validation" if bucket < VALIDATION_PERCENT else "train"


@dataclasses.dataclass
class StdlibConfig(tfds.core.BuilderConfig):
  source_dir: str | None = None  # None: the running interpreter's stdlib


class PythonStdlib(tfds.core.GeneratorBasedBuilder):
  """The running interpreter's standard library sources, one file per example."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.", "1.1.0": "Prepared as ArrayRecord by default."}
  BUILDER_CONFIGS = [StdlibConfig(name="default", description="the interpreter's stdlib")]

  def _root(self) -> str:
    return self.builder_config.source_dir or stdlib_dir()

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
        metadata=tfds.core.MetadataDict(python_version=platform.python_version(),
                                        source_dir=self._root()),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    root = self._root()
    files = source_files(root) if os.path.isdir(root) else []
    splits = {"train": [], "validation": []}
    for f in files:
      splits[split_of(f)].append(f)
    empty = [name for name, fs in splits.items() if not fs]
    if empty:
      raise ValueError(f"corpus under {root!r} has {len(files)} .py file(s) and leaves split(s) "
                       f"{empty} empty; point source_dir at a directory with more Python sources")
    return {name: self._generate_examples(root, fs) for name, fs in splits.items()}

  def _generate_examples(self, root, files):
    for rel in files:
      with open(os.path.join(root, rel), "rb") as fh:
        text = fh.read().decode("utf-8", errors="replace")
      yield rel, {"text": text, "path": rel}
