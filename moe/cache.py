"""The one cache root: compiled XLA executables, prepared datasets and tokenizers, the
built C++ kernel. `$MOE_CACHE_DIR` moves all of it (default ~/.cache/deepseekmoe-jax).

This module imports no JAX, so the data package can use it too.
"""

from __future__ import annotations

import os

ENV_VAR = "MOE_CACHE_DIR"


def cache_dir(*parts: str) -> str:
  """$MOE_CACHE_DIR (default ~/.cache/deepseekmoe-jax) joined with `parts`; not created."""
  root = os.environ.get(ENV_VAR) or os.path.join("~", ".cache", "deepseekmoe-jax")
  return os.path.join(os.path.expanduser(root), *parts)


def enable_compile_cache(path: str | None = None) -> None:
  """Persist compiled XLA executables (default: cache_dir('xla')): on CPU, compiles
  dominate the start-up of short runs and of the test suite."""
  import jax

  jax.config.update("jax_compilation_cache_dir", path or cache_dir("xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
