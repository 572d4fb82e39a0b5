"""Builds and registers this project's C++ XLA FFI kernels for CPU (moe/dispatch/expert_swiglu.cc,
moe/model/cpu_attention.cc).

A kernel is compiled on first use with the system C++ compiler against jaxlib's FFI headers,
the shared header cpu_kernels.h (beside this file: OpenBLAS's sgemm, a thread pool) and the
OpenBLAS that numpy ships, and cached under the cache root; `load` says why a kernel is
unavailable where it cannot be built.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jaxlib
import numpy as np

from moe.cache import cache_dir

HEADER = os.path.join(os.path.dirname(__file__), "cpu_kernels.h")


def openblas() -> str | None:
  """numpy's bundled OpenBLAS (64-bit-index cblas with the scipy_ symbol prefix), if any."""
  libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
  found = sorted(glob.glob(os.path.join(libs, "libscipy_openblas64_*.so")))
  return found[0] if found else None


def compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


# /proc/cpuinfo lines naming the instruction set (x86, ARM, RISC-V, s390x), and, for kernels
# that print none of those, the lines naming the CPU model.
_FEATURE_KEYS = ("flags", "Features", "isa", "features")
_MODEL_KEYS = ("CPU implementer", "CPU architecture", "CPU variant", "CPU part", "model name",
               "cpu model", "cpu")


def cpu_key(cpuinfo: str) -> str:
  """What a -march=native build depends on, from /proc/cpuinfo text: the instruction-set
  feature lines (every distinct one: cores may differ), else the model lines, else ""."""
  fields: dict[str, set[str]] = {}
  for line in cpuinfo.splitlines():
    name, sep, value = line.partition(":")
    if sep:
      fields.setdefault(name.strip(), set()).add(" ".join(value.split()))
  for keys in (_FEATURE_KEYS, _MODEL_KEYS):
    found = [f"{k}: {v}" for k in keys for v in sorted(fields.get(k, ()))]
    if found:
      return "\n".join(found)
  return ""


def cpu_flags() -> str:
  """This CPU's instruction set (the build uses -march=native)."""
  try:
    with open("/proc/cpuinfo") as f:
      key = cpu_key(f.read())
  except OSError:  # not Linux
    key = ""
  return key or platform.machine() + " " + platform.processor()


def library_path(source: str, blas: str, cxx: str) -> str:
  """Where a kernel lives in the cache: one build per source (and shared header), jax/jaxlib,
  BLAS, compiler (and its version) and CPU instruction set, so a home directory shared
  across a mixed cluster never loads a binary built for another CPU."""
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
  parts = [open(source, "rb").read().decode(), open(HEADER, "rb").read().decode(), jax.__version__,
           jaxlib.__version__, blas, cxx, version, cpu_flags()]
  key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
  name = os.path.splitext(os.path.basename(source))[0]
  return os.path.join(cache_dir("kernels"), f"{name}-{key}.so")


def build(source: str, blas: str) -> str:
  """Compiles `source` once per build key (library_path); returns the shared library."""
  cxx = compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler (set CXX or install g++)")
  lib = library_path(source, blas, cxx)
  if os.path.exists(lib):
    return lib
  build_dir = os.path.dirname(lib)
  os.makedirs(build_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=build_dir) as tmp:
    out = os.path.join(tmp, "lib.so")
    cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
           f"-I{jax.ffi.include_dir()}", f"-I{os.path.dirname(HEADER)}", source, "-o", out, blas,
           f"-Wl,-rpath,{os.path.dirname(blas)}", "-lpthread"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"compiling {source} failed:\n{result.stderr[-2000:]}")
    os.replace(out, lib)  # atomic: a concurrent build leaves one complete file
  return lib


@functools.cache
def load(source: str, targets: tuple[str, ...]) -> str | None:
  """Builds `source` and registers its FFI `targets` with XLA:CPU: None once done, else why not."""
  blas = openblas()
  if blas is None:
    return "numpy ships no scipy-openblas64 library here (numpy.libs/libscipy_openblas64_*.so)"
  try:
    lib = ctypes.cdll.LoadLibrary(build(source, blas))
  except (OSError, RuntimeError) as e:
    return str(e)
  for name in targets:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
  return None


class Kernel:
  """One kernel source and its FFI targets: `status()` builds and registers them on first
  call (None once done, else why not)."""

  def __init__(self, source: str, targets: tuple[str, ...]):
    self.source, self.targets = source, targets

  def status(self) -> str | None:
    return load(self.source, self.targets)

  def available(self) -> bool:
    return self.status() is None


def threads(work_items: int) -> int:
  """Threads for a call with `work_items` independent parts: one per core, at most one per
  item and at most 8 (each thread may hold a private output buffer)."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cores = os.cpu_count() or 1
  return max(1, min(cores, work_items, 8))
