"""Routed SwiGLU experts through a C++ XLA FFI kernel on CPU (expert_swiglu.cc, beside this file).

Each thread takes whole experts and runs their matmuls single-threaded, where XLA:CPU splits
every small per-expert matmul over all cores and scales poorly at DeepSeekMoE's expert sizes
(docs/bench_moe.md). The kernel is compiled on first use with the system C++ compiler
against jaxlib's FFI headers and the OpenBLAS that numpy ships, and cached; `status()` says
why it is unavailable where it cannot be built. f32 only.

The kernel never reads expert indices: it takes rows by group_sizes, and the rows past
sum(group_sizes) ("no expert" pairs, moe.dispatch.sorting) are padding it neither gathers
nor multiplies (their saved rows and gate gradients are written as exact zeros).
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
import jax.numpy as jnp
import jaxlib
import numpy as np

from moe.cache import cache_dir
from moe.dispatch import fused_loop
from moe.dispatch.backend import Backend
from moe.dispatch.sorting import SortedRouting, row_tokens_and_gates

_SOURCE = os.path.join(os.path.dirname(__file__), "expert_swiglu.cc")
_TARGETS = ("ExpertSwigluForward", "ExpertSwigluBackward")


def _openblas() -> str | None:
  """numpy's bundled OpenBLAS (64-bit-index cblas with the scipy_ symbol prefix), if any."""
  libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
  found = sorted(glob.glob(os.path.join(libs, "libscipy_openblas64_*.so")))
  return found[0] if found else None


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


# /proc/cpuinfo lines naming the instruction set (x86, ARM, RISC-V, s390x), and, for kernels
# that print none of those, the lines naming the CPU model.
_FEATURE_KEYS = ("flags", "Features", "isa", "features")
_MODEL_KEYS = ("CPU implementer", "CPU architecture", "CPU variant", "CPU part", "model name",
               "cpu model", "cpu")


def _cpu_key(cpuinfo: str) -> str:
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


def _cpu_flags() -> str:
  """This CPU's instruction set (the build uses -march=native)."""
  try:
    with open("/proc/cpuinfo") as f:
      key = _cpu_key(f.read())
  except OSError:  # not Linux
    key = ""
  return key or platform.machine() + " " + platform.processor()


def _library_path(blas: str, compiler: str) -> str:
  """Where the kernel lives in the cache: one build per source, jax/jaxlib, BLAS, compiler
  (and its version) and CPU instruction set, so a home directory shared across a mixed
  cluster never loads a binary built for another CPU."""
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  parts = [open(_SOURCE, "rb").read().decode(), jax.__version__, jaxlib.__version__, blas,
           compiler, version, _cpu_flags()]
  key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
  return os.path.join(cache_dir("kernels"), f"expert_swiglu-{key}.so")


def _build(blas: str) -> str:
  """Compiles the kernel once per build key (_library_path); returns the shared library."""
  compiler = _compiler()
  if compiler is None:
    raise RuntimeError("no C++ compiler (set CXX or install g++)")
  lib = _library_path(blas, compiler)
  if os.path.exists(lib):
    return lib
  build_dir = os.path.dirname(lib)
  os.makedirs(build_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=build_dir) as tmp:
    out = os.path.join(tmp, "lib.so")
    cmd = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
           f"-I{jax.ffi.include_dir()}", _SOURCE, "-o", out, blas, f"-Wl,-rpath,{os.path.dirname(blas)}",
           "-lpthread"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"compiling {_SOURCE} failed:\n{result.stderr[-2000:]}")
    os.replace(out, lib)  # atomic: a concurrent build leaves one complete file
  return lib


@functools.cache
def status() -> str | None:
  """None once the kernel is built and registered with XLA; else why it is not."""
  blas = _openblas()
  if blas is None:
    return "numpy ships no scipy-openblas64 library here (numpy.libs/libscipy_openblas64_*.so)"
  try:
    lib = ctypes.cdll.LoadLibrary(_build(blas))
  except (OSError, RuntimeError) as e:
    return str(e)
  for name in _TARGETS:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
  return None


def available() -> bool:
  return status() is None


def _threads(n_experts: int) -> int:
  """One per core, at most one per expert and at most 8: each thread beyond the first adds
  into its own [T, d] output buffer."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cores = os.cpu_count() or 1
  return max(1, min(cores, n_experts, 8))


def _shape(a) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(a.shape, jnp.float32)


def _forward(x, tok, gate, w_gate, w_up, w_down, group_sizes):
  ab = jax.ShapeDtypeStruct((tok.shape[0], 2 * w_gate.shape[2]), jnp.float32)
  return jax.ffi.ffi_call("ExpertSwigluForward", (_shape(x), ab), vmap_method="sequential")(
      x, tok, gate, w_gate, w_up, w_down, group_sizes, threads=np.int64(_threads(w_gate.shape[0])))


@jax.custom_vjp
def _experts(x, tok, gate, w_gate, w_up, w_down, group_sizes):
  return _forward(x, tok, gate, w_gate, w_up, w_down, group_sizes)[0]


def _experts_fwd(x, tok, gate, w_gate, w_up, w_down, group_sizes):
  out, ab = _forward(x, tok, gate, w_gate, w_up, w_down, group_sizes)
  return out, (x, tok, gate, w_gate, w_up, w_down, group_sizes, ab)


def _experts_bwd(res, d_out):
  x, tok, gate, w_gate, w_up, w_down, group_sizes, ab = res
  shapes = tuple(map(_shape, (x, gate, w_gate, w_up, w_down)))
  grads = jax.ffi.ffi_call("ExpertSwigluBackward", shapes, vmap_method="sequential")(
      x, tok, gate, w_gate, w_up, w_down, group_sizes, ab, d_out.astype(jnp.float32),
      threads=np.int64(_threads(w_gate.shape[0])))
  dx, d_gate, d_wg, d_wu, d_wd = grads
  return dx, None, d_gate, d_wg, d_wu, d_wd, None


_experts.defvjp(_experts_fwd, _experts_bwd)


def ffi_swiglu_experts(x: jax.Array, routing: SortedRouting, gates: jax.Array, w_gate: jax.Array,
                       w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """x: [T, d] f32, gates: [T, K'], w_gate/w_up: [E, d, f], w_down: [E, f, d] -> [T, d].

  The same function as moe.dispatch.fused_loop.fused_swiglu_experts; a token's K' experts distinct.
  """
  problem = status()
  if problem is not None:
    raise RuntimeError(f"dispatch 'cpu_ffi' is unavailable here: {problem}")
  if jax.default_backend() != "cpu":
    raise RuntimeError(f"dispatch 'cpu_ffi' runs on CPU only, not {jax.default_backend()}")
  tok, gate_rows = row_tokens_and_gates(routing, gates)
  return _experts(x, tok, gate_rows, w_gate, w_up, w_down, routing.group_sizes.astype(jnp.int32))


class CpuKernelBackend(Backend):
  """The routed experts as one C++ XLA FFI call per pass, experts spread over CPU threads;
  f32 only, other dtypes run the fused loop."""

  def experts(self, x, routing, gates, weights):
    if x.dtype != jnp.float32 or any(w.dtype != jnp.float32 for w in weights):
      return fused_loop.fused_swiglu_experts(x, routing, gates, *weights)
    with jax.named_scope("routed_experts"):  # gathers and scatters included: one kernel
      return ffi_swiglu_experts(x, routing, gates, *weights)
