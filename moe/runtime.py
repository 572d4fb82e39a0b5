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


def initialize_distributed() -> None:
  """Join the other hosts of a multi-host job (a TPU pod slice: one process per host).

  Must run before anything else touches JAX. On Cloud TPU VMs the coordinator, process
  count and index are discovered from the environment; elsewhere set
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)
