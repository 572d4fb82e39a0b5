"""One cache root: $MOE_CACHE_DIR moves compiled executables, prepared data and the built
C++ kernel together."""

import os

from data.config import DataConfig
from moe import cache


def test_one_variable_moves_every_cache(monkeypatch, tmp_path):
  monkeypatch.delenv(cache.ENV_VAR, raising=False)
  assert cache.cache_dir() == os.path.expanduser("~/.cache/deepseekmoe-jax")
  monkeypatch.setenv(cache.ENV_VAR, str(tmp_path))
  assert cache.cache_dir("xla") == str(tmp_path / "xla")
  assert DataConfig().root == str(tmp_path / "tfds")
  assert DataConfig(data_dir="/elsewhere").root == "/elsewhere"


def test_kernel_is_built_under_the_cache_root_per_cpu_and_compiler(monkeypatch, tmp_path):
  from moe import cpu_build
  from moe.dispatch import cpu_kernel
  compiler = cpu_build.compiler()
  if compiler is None:
    return  # no compiler: status() says so (tests/test_cpu_ffi.py)
  monkeypatch.setenv(cache.ENV_VAR, str(tmp_path))
  path = cpu_build.library_path(cpu_kernel._SOURCE, "/any/libblas.so", compiler)
  assert os.path.dirname(path) == str(tmp_path / "kernels")
  monkeypatch.setattr(cpu_build, "cpu_flags", lambda: "flags : sse2")  # another CPU
  assert cpu_build.library_path(cpu_kernel._SOURCE, "/any/libblas.so", compiler) != path
