"""Dropless dispatch backends: how (token, choice) rows are permuted into expert order,
multiplied by their expert's weights, and combined back with the gates.

`ModelConfig.dispatch` names one; "auto" picks the Pallas kernels on TPU, XLA's ragged
dot on GPU (a native grouped GEMM there), and the tiled XLA loop on CPU. Every backend
computes the same function (tests/test_dispatch.py checks each against a loop reference).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from moe import dispatch, grouped_matmul
from moe.experts import GroupedMatmul
from pallas_kernels import ops as pallas_ops


class Backend(NamedTuple):
  gmm: GroupedMatmul                                                      # [m,k] x [G,k,n] -> [m,n]
  permute: Callable[[jax.Array, dispatch.SortedRouting, int], jax.Array]  # [T,d] -> [T*K,d]
  combine: Callable[[jax.Array, dispatch.SortedRouting, jax.Array], jax.Array]  # -> [T,d]


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
    "tiled": Backend(gmm=grouped_matmul.gmm, **_XLA_MOVES),
    "ragged_dot": Backend(gmm=ragged_dot_gmm, **_XLA_MOVES),
    "pallas": _pallas(interpret=False),
    "pallas_interpret": _pallas(interpret=True),
}
AUTO = {"tpu": "pallas", "gpu": "ragged_dot", "cpu": "tiled"}


def resolve(name: str) -> Backend:
  """The backend called `name`; "auto" chooses by the default JAX platform."""
  if name == "auto":
    name = AUTO.get(jax.default_backend(), "tiled")
  return BACKENDS[name]


def names() -> list[str]:
  return ["auto", *BACKENDS]
