"""Test setup: 8 simulated CPU devices (set before JAX is imported) and shared fixtures."""

import os

# XLA:CPU aborts the process when a collective's threads arrive over 40 s apart; on a busy
# 2-core CI machine 8 simulated devices can, so the tests (and their subprocesses) wait longer.
COLLECTIVE_TIMEOUTS = ("--xla_cpu_collective_call_terminate_timeout_seconds=1200 "
                       "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300 "
                       "--xla_cpu_collective_timeout_seconds=1200")
# Compiles dominate a cold run of this suite and the shapes are tiny: LLVM at -O0 compiles
# about a third faster (tests/test_model.py + test_routing.py cold: 102 s -> 70 s).
FAST_COMPILES = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", " ".join(("--xla_force_host_platform_device_count=8",
                                             COLLECTIVE_TIMEOUTS, FAST_COMPILES)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile for abstract TPU slices (libtpu) from several processes at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Compiled executables persist across runs (CPU compiles dominate this suite's time).
from moe.cache import enable_compile_cache  # noqa: E402

enable_compile_cache()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
  """(source_dir, data_dir): a small local copy of stdlib modules and an empty tfds dir."""
  from tests.data_fixtures import make_corpus

  return (make_corpus(str(tmp_path_factory.mktemp("corpus_src"))),
          str(tmp_path_factory.mktemp("tfds")))
