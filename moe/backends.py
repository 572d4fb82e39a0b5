"""Dropless dispatch backends: how (token, choice) rows are permuted into expert order,
multiplied by their expert's weights, and combined back with the gates.

`ModelConfig.dispatch` names one; "auto" picks the Pallas kernels on TPU, on CPU the C++
FFI kernel (moe.cpu_ffi) where it builds and the fused XLA loop (moe.fused_moe) where not,
and on GPU "by_size": XLA's ragged dot for small layers, the
fused loop for large ones (JAX 0.11's XLA:GPU expands ragged_dot into a dense product per
group, like XLA:CPU; docs/bench_moe_gpu.md). Every backend computes the same function
(tests/test_dispatch.py checks each against a loop reference).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from moe import cpu_ffi, dispatch, experts, fused_moe, grouped_matmul
from moe.experts import GroupedMatmul
from pallas_kernels import ops as pallas_ops


@dataclasses.dataclass(frozen=True)
class Backend:
  """Three pieces composed into the routed experts; expert parallelism reuses `gmm`."""
  gmm: GroupedMatmul                                                      # [m,k] x [G,k,n] -> [m,n]
  permute: Callable[[jax.Array, dispatch.SortedRouting, int], jax.Array]  # [T,d] -> [T*K,d]
  combine: Callable[[jax.Array, dispatch.SortedRouting, jax.Array], jax.Array]  # -> [T,d]

  def experts(self, x: jax.Array, routing: dispatch.SortedRouting, gates: jax.Array, weights) -> jax.Array:
    """x: [T, d], gates: [T, K'] -> sum_k gate_k * expert_k(x), [T, d]."""
    rows = self.permute(x, routing, gates.shape[1])
    out = experts.grouped_swiglu(rows, routing.group_sizes, *weights, gmm=self.gmm)
    return self.combine(out, routing, gates)


class FusedBackend(Backend):
  """Permute, SwiGLU and combine in one XLA loop per pass (moe.fused_moe): no [T*K', d]
  arrays in memory, the fastest path on CPU."""

  def experts(self, x, routing, gates, weights):
    return fused_moe.fused_swiglu_experts(x, routing, gates, *weights)


class CpuFfiBackend(Backend):
  """The routed experts as one C++ XLA FFI call per pass, experts spread over CPU threads
  (moe.cpu_ffi); f32 only, other dtypes run the fused loop."""

  def experts(self, x, routing, gates, weights):
    if x.dtype != jnp.float32 or any(w.dtype != jnp.float32 for w in weights):
      return fused_moe.fused_swiglu_experts(x, routing, gates, *weights)
    return cpu_ffi.ffi_swiglu_experts(x, routing, gates, *weights)


def ragged_dot_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """XLA's ragged dot: a native grouped matmul on TPU; on CPU, and on GPU with JAX 0.11
  (measured on an H200, bf16 and f32), a dense product per group masked afterwards."""
  return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                            preferred_element_type=jnp.float32).astype(lhs.dtype)


def ragged_dot_bytes(n_rows: int, rhs: jax.Array) -> int:
  """What XLA's dense expansion of ragged_dot([n_rows, k], rhs [G, k, n]) touches, in bytes:
  a [G, n_rows, max(k, n)] array."""
  n_groups, k, n = rhs.shape
  return n_groups * n_rows * max(k, n) * rhs.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class BySizeBackend(Backend):
  """`small` while XLA's dense expansion of ragged_dot stays under `limit_bytes`, else
  `large`; decided per layer (and, under expert parallelism, per grouped matmul) at trace
  time from static shapes. On an H200, ragged_dot ran the tiny preset's training step in
  0.37x the fused loop's time, and the DeepSeekMoE-16B layer shape in 14x (with 98 GiB of
  temporaries): docs/bench_moe_gpu.md."""
  small: Backend | None = None
  large: Backend | None = None
  limit_bytes: int = 1 << 30

  def __post_init__(self):
    # gmm is a field of Backend; here it follows the same rule, so it is derived, not given.
    object.__setattr__(self, "gmm", lambda lhs, rhs, gs: self.pick(lhs.shape[0], rhs).gmm(lhs, rhs, gs))

  def pick(self, n_rows: int, rhs: jax.Array) -> Backend:
    return self.small if ragged_dot_bytes(n_rows, rhs) <= self.limit_bytes else self.large

  def experts(self, x, routing, gates, weights):
    return self.pick(routing.order.shape[0], weights[0]).experts(x, routing, gates, weights)


def _pallas(interpret: bool) -> Backend:
  return Backend(
      gmm=lambda lhs, rhs, gs: pallas_ops.gmm(lhs, rhs, gs, pallas_ops.Tiling(), interpret),
      permute=lambda x, r, k: pallas_ops.permute(x, r.order, k, interpret),
      combine=lambda y, r, gates: pallas_ops.combine(y, r.order, gates, interpret),
  )


_XLA_MOVES = dict(permute=dispatch.permute, combine=dispatch.unpermute)

BACKENDS: dict[str, Backend] = {
    "fused": FusedBackend(gmm=grouped_matmul.gmm, **_XLA_MOVES),
    "cpu_ffi": CpuFfiBackend(gmm=grouped_matmul.gmm, **_XLA_MOVES),
    "tiled": Backend(gmm=grouped_matmul.gmm, **_XLA_MOVES),
    "ragged_dot": Backend(gmm=ragged_dot_gmm, **_XLA_MOVES),
    "pallas": _pallas(interpret=False),
    "pallas_interpret": _pallas(interpret=True),
}
BACKENDS["by_size"] = BySizeBackend(gmm=None, small=BACKENDS["ragged_dot"], large=BACKENDS["fused"],
                                    **_XLA_MOVES)
AUTO = {"tpu": "pallas", "gpu": "by_size", "cpu": "cpu_ffi"}


def resolve(name: str) -> Backend:
  """The backend called `name`; "auto" chooses by the default JAX platform."""
  if name == "auto":
    name = default_name()
  return BACKENDS[name]


def default_name() -> str:
  """The backend "auto" picks on this machine's default JAX platform; on CPU the C++ FFI
  kernel where it builds (moe.cpu_ffi.status() says why not), else the fused loop."""
  name = AUTO.get(jax.default_backend(), "fused")
  if name == "cpu_ffi" and not cpu_ffi.available():
    return "fused"
  return name


def concrete_name(name: str, n_rows: int, rhs: jax.Array) -> str:
  """The backend that runs a layer of `n_rows` routed rows and expert weights like `rhs`
  ([G, k, n]) under `name` ("auto" and "by_size" resolved)."""
  backend = resolve(name)
  if isinstance(backend, BySizeBackend):
    backend = backend.pick(n_rows, rhs)
  return next(n for n, b in BACKENDS.items() if b is backend)


def names() -> list[str]:
  return ["auto", *BACKENDS]
