"""Dropless dispatch backends: how (token, choice) rows are permuted into expert order,
multiplied by their expert's weights, and combined back with the gates.

`ModelConfig.dispatch` names one; "auto" picks the Pallas kernels on TPU, XLA's ragged
dot on GPU (a native grouped GEMM there), and the fused XLA loop (moe.fused_moe) on CPU.
Every backend computes the same function (tests/test_dispatch.py checks each against a
loop reference).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from moe import dispatch, experts, fused_moe, grouped_matmul
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


def ragged_dot_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """XLA's ragged dot: native grouped matmul on TPU/GPU, a masked dense batch on CPU."""
  return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                            preferred_element_type=jnp.float32).astype(lhs.dtype)


def _pallas(interpret: bool) -> Backend:
  return Backend(
      gmm=lambda lhs, rhs, gs: pallas_ops.gmm(lhs, rhs, gs, pallas_ops.Tiling(), interpret),
      permute=lambda x, r, k: pallas_ops.permute(x, r.order, k, interpret),
      combine=lambda y, r, gates: pallas_ops.combine(y, r.order, gates, interpret),
  )


_XLA_MOVES = dict(permute=dispatch.permute, combine=dispatch.unpermute)

BACKENDS: dict[str, Backend] = {
    "fused": FusedBackend(gmm=grouped_matmul.gmm, **_XLA_MOVES),
    "tiled": Backend(gmm=grouped_matmul.gmm, **_XLA_MOVES),
    "ragged_dot": Backend(gmm=ragged_dot_gmm, **_XLA_MOVES),
    "pallas": _pallas(interpret=False),
    "pallas_interpret": _pallas(interpret=True),
}
AUTO = {"tpu": "pallas", "gpu": "ragged_dot", "cpu": "fused"}


def resolve(name: str) -> Backend:
  """The backend called `name`; "auto" chooses by the default JAX platform."""
  if name == "auto":
    name = default_name()
  return BACKENDS[name]


def default_name() -> str:
  """The backend "auto" picks on this machine's default JAX platform."""
  return AUTO.get(jax.default_backend(), "fused")


def names() -> list[str]:
  return ["auto", *BACKENDS]
