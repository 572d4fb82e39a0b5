"""Process-level setup shared by scripts, notebooks and tests."""

from __future__ import annotations

import os

import jax


def compile_cache_dir() -> str:
  return os.environ.get("MOE_COMPILE_CACHE", os.path.expanduser("~/.cache/deepseekmoe-jax/xla"))


def enable_compile_cache(path: str | None = None) -> None:
  """Persist compiled XLA executables: CPU compiles dominate short runs' start-up."""
  jax.config.update("jax_compilation_cache_dir", path or compile_cache_dir())
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
