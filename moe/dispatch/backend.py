"""A dropless dispatch backend: how (token, choice) rows are permuted into expert order,
multiplied by their expert's weights, and combined back with the gates.

Every backend computes the same function (tests/test_dispatch.py checks each against a
loop reference); moe.dispatch.registry names them and picks one per platform. A new
backend is a Backend (or subclass) built in the registry.

"No expert" pairs (expert index N', zero-compute experts) sort after every group
(moe.dispatch.sorting); what each backend's grouped matmul spends on those rows:
    tiled, fused            nothing: loops over groups, bounded by their sizes (beyond the
                            padding of the last group's last tile or chunk)
    cpu_ffi                 nothing: the C++ kernel takes rows by group sizes
    pallas(_interpret)      nothing: visits only the groups' row tiles; the permute and
                            combine kernels copy no row of a "no expert" pair
    ragged_dot              on CPU (and GPU, JAX 0.11) XLA's dense expansion multiplies
                            every row, theirs too, by every expert and masks afterwards
    tokamax                 whatever its kernel does; moe.dispatch.gpu sets those rows to 0
    few_tokens              see moe.dispatch.few_tokens
Every one gives those rows 0, so they add nothing, whatever their gates.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from moe.dispatch import experts, fused_loop, sorting
from moe.dispatch.experts import GroupedMatmul
from moe.dispatch.sorting import SortedRouting


@dataclasses.dataclass(frozen=True)
class Backend:
  """Three pieces composed into the routed experts; expert parallelism reuses `gmm`."""
  gmm: GroupedMatmul                                                      # [m,k] x [G,k,n] -> [m,n]
  permute: Callable[[jax.Array, SortedRouting, int], jax.Array]           # [T,d] -> [T*K,d]
  combine: Callable[[jax.Array, SortedRouting, jax.Array], jax.Array]     # -> [T,d]

  def routed(self, x: jax.Array, expert_idx: jax.Array, gates: jax.Array, weights) -> jax.Array:
    """x: [T, d], expert_idx, gates: [T, K'] -> sum_k gate_k * expert_k(x), [T, d]: the rows
    sorted by expert, then `experts` (a backend that needs no sort overrides this)."""
    return self.experts(x, sorting.sort_by_expert(expert_idx, weights[0].shape[0]), gates, weights)

  def experts(self, x: jax.Array, routing: SortedRouting, gates: jax.Array, weights) -> jax.Array:
    """x: [T, d], gates: [T, K'] -> sum_k gate_k * expert_k(x), [T, d]."""
    rows = self.permute(x, routing, gates.shape[1])
    out = experts.grouped_swiglu(rows, routing.group_sizes, *weights, gmm=self.gmm)
    return self.combine(out, routing, gates)


class FusedLoopBackend(Backend):
  """Permute, SwiGLU and combine in one XLA loop per pass (moe.dispatch.fused_loop): no
  [T*K', d] arrays in memory."""

  def experts(self, x, routing, gates, weights):
    return fused_loop.fused_swiglu_experts(x, routing, gates, *weights)


def ragged_dot_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """XLA's ragged dot: a native grouped matmul on TPU; on CPU, and on GPU with JAX 0.11
  (measured on an H200, bf16 and f32), a dense product per group masked afterwards, so
  there rows past sum(group_sizes) are multiplied too (and then set to 0)."""
  return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                            preferred_element_type=jnp.float32).astype(lhs.dtype)


def ragged_dot_bytes(n_rows: int, rhs: jax.Array) -> int:
  """What XLA's dense expansion of ragged_dot([n_rows, k], rhs [G, k, n]) touches, in bytes:
  a [G, n_rows, max(k, n)] array."""
  n_groups, k, n = rhs.shape
  return n_groups * n_rows * max(k, n) * rhs.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class RaggedOrFusedBackend(Backend):
  """`small` (ragged_dot) while XLA's dense expansion of ragged_dot stays under
  `limit_bytes`, else `large` (the fused loop); decided per layer (and, under expert
  parallelism, per grouped matmul) at trace time from static shapes. On an H200, ragged_dot
  ran the tiny preset's training step in 0.37x the fused loop's time, and the
  DeepSeekMoE-16B layer shape in 14x (with 98 GiB of temporaries): docs/bench_moe_gpu.md."""
  small: Backend | None = None
  large: Backend | None = None
  limit_bytes: int = 1 << 30

  def __post_init__(self):
    # gmm is a field of Backend; here it follows the same rule, so it is derived, not given.
    object.__setattr__(self, "gmm", lambda lhs, rhs, gs: self.pick(lhs.shape[0], rhs).gmm(lhs, rhs, gs))

  def picks_small(self, n_rows: int, rhs: jax.Array) -> bool:
    return ragged_dot_bytes(n_rows, rhs) <= self.limit_bytes

  def pick(self, n_rows: int, rhs: jax.Array) -> Backend:
    return self.small if self.picks_small(n_rows, rhs) else self.large

  def experts(self, x, routing, gates, weights):
    return self.pick(routing.order.shape[0], weights[0]).experts(x, routing, gates, weights)
