"""An exclusive lock on a file, for the cached artefacts under the data root (a prepared
dataset, a trained tokenizer) that runs started side by side would otherwise each build."""

from __future__ import annotations

import contextlib
import fcntl
import os


@contextlib.contextmanager
def file_lock(path: str):
  """Holds an exclusive flock on `path` (created if missing). Not reentrant: a second
  file_lock on the same path in one process waits forever, so nested ones use other paths."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
