"""custom_vjp wiring of the Pallas kernels; nothing else lives here.

gmm's VJP is a gmm that reads the weights transposed in the kernel (d lhs; no transposed
copy) and a tgmm (d rhs). The token permute and combine are gathers whose VJPs are gathers
in the other direction. `tiling` None lets each pass pick its tiles for its own shape
(pallas_kernels.tiling); a Tiling given is used by every pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import gmm as gmm_kernels
from pallas_kernels import permute as permute_kernels
from pallas_kernels.gmm import Tiling


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def gmm(lhs, rhs, group_sizes, tiling: Tiling | None = None, interpret: bool = False):
  """lhs: [m, k] sorted by group, rhs: [G, k, n], group_sizes: [G] -> [m, n]."""
  return gmm_kernels.gmm(lhs, rhs, group_sizes, tiling=tiling, interpret=interpret)


def _gmm_fwd(lhs, rhs, group_sizes, tiling, interpret):
  return gmm(lhs, rhs, group_sizes, tiling, interpret), (lhs, rhs, group_sizes)


def _gmm_bwd(tiling, interpret, res, dy):
  lhs, rhs, group_sizes = res
  dy = dy.astype(lhs.dtype)
  d_lhs = gmm_kernels.gmm(dy, rhs, group_sizes, tiling=tiling, transpose_rhs=True, interpret=interpret)
  d_rhs = gmm_kernels.tgmm(lhs, dy, group_sizes, rhs.shape[0], tiling=tiling, interpret=interpret)
  return d_lhs, d_rhs, None


gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def permute(x, order, k: int, interpret: bool = False):
  """x: [T, d], order: [T*K] sorted (token, choice) pair ids -> rows x[order // K], [T*K, d]."""
  return permute_kernels.gather_rows(x, order // k, interpret=interpret)


def _permute_fwd(x, order, k, interpret):
  return permute(x, order, k, interpret), order


def _permute_bwd(k, interpret, order, d_rows):
  # d x[t] = sum over t's K rows: a combine with unit weights through the inverse order.
  inverse = jnp.argsort(order)
  ones = jnp.ones((order.shape[0] // k, k), jnp.float32)
  return permute_kernels.combine_rows(d_rows, inverse, ones, interpret=interpret), None


permute.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def combine(y, order, gates, interpret: bool = False):
  """y: [T*K, d] in sorted order, gates: [T, K] -> sum_j gates[t, j] * y[row of (t, j)], [T, d]."""
  return permute_kernels.combine_rows(y, jnp.argsort(order), gates, interpret=interpret)


def _combine_fwd(y, order, gates, interpret):
  inverse = jnp.argsort(order)
  out = permute_kernels.combine_rows(y, inverse, gates, interpret=interpret)
  return out, (y, order, inverse, gates)


def _combine_bwd(interpret, res, d_out):
  y, order, inverse, gates = res
  k = gates.shape[1]
  # d y[i] = gate of pair order[i] * d_out[its token]; d gates[t, j] = <d_out[t], y[row of (t, j)]>.
  d_y = permute_kernels.gather_rows(d_out, order // k, interpret=interpret)
  d_y = d_y * gates.reshape(-1)[order][:, None].astype(d_y.dtype)
  y_by_token = permute_kernels.gather_rows(y, inverse, interpret=interpret)
  d_gates = jnp.einsum("tjd,td->tj", y_by_token.reshape(*gates.shape, -1).astype(jnp.float32),
                       d_out.astype(jnp.float32))
  return d_y, None, d_gates.astype(gates.dtype)


combine.defvjp(_combine_fwd, _combine_bwd)
