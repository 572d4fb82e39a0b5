"""Test setup: 8 simulated CPU devices (set before JAX is imported) and shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Compiled executables persist across runs (CPU compiles dominate this suite's time).
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("MOE_TEST_COMPILE_CACHE",
                                 os.path.expanduser("~/.cache/deepseekmoe-jax/xla")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
