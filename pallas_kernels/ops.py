"""custom_vjp wiring of the Pallas kernels; nothing else lives here.

gmm's VJP is a gmm that reads the weights transposed in the kernel (d lhs; no transposed
copy) and a tgmm (d rhs). The token permute and combine are gathers whose VJPs are gathers
in the other direction (combine's: one gather of d_out rows, for both d y and d gates).
`tiling` None lets each pass pick its tiles for its own shape (pallas_kernels.tiling); a
Tiling given is used by every pass.
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


def _limit(n_rows, order: jax.Array) -> jax.Array:
  return jnp.asarray(order.shape[0] if n_rows is None else n_rows, jnp.int32)


def permute(x, order, k: int, interpret: bool = False, n_rows=None):
  """x: [T, d], order: [T*K] sorted (token, choice) pair ids -> rows x[order // K], [T*K, d].

  n_rows: the sorted rows that go to an expert (default all): the rest ("no expert" pairs,
  sorted last) are not copied and hold undefined values, which the grouped matmuls never
  read (they give 0 past the groups and mask those rows out of tgmm)."""
  return _permute(x, order, _limit(n_rows, order), k, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _permute(x, order, n_rows, k: int, interpret: bool):
  return permute_kernels.gather_rows(x, order // k, n_rows, interpret=interpret)


def _permute_fwd(x, order, n_rows, k, interpret):
  return _permute(x, order, n_rows, k, interpret), (order, n_rows)


def _permute_bwd(k, interpret, res, d_rows):
  # d x[t] = sum over t's K rows: a combine with unit weights through the inverse order.
  order, n_rows = res
  inverse = jnp.argsort(order)
  ones = jnp.ones((order.shape[0] // k, k), jnp.float32)
  return permute_kernels.combine_rows(d_rows, inverse, ones, n_rows, interpret=interpret), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def combine(y, order, gates, interpret: bool = False, n_rows=None):
  """y: [T*K, d] in sorted order, gates: [T, K] -> sum_j gates[t, j] * y[row of (t, j)], [T, d].

  n_rows: as in `permute`; a pair sorted at or past it is not read: it adds 0 and its
  gate gets 0 gradient."""
  return _combine(y, order, gates, _limit(n_rows, order), interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _combine(y, order, gates, n_rows, interpret: bool):
  return permute_kernels.combine_rows(y, jnp.argsort(order), gates, n_rows, interpret=interpret)


def _combine_fwd(y, order, gates, n_rows, interpret):
  inverse = jnp.argsort(order)
  out = permute_kernels.combine_rows(y, inverse, gates, n_rows, interpret=interpret)
  return out, (y, order, inverse, gates, n_rows)


def _combine_bwd(interpret, res, d_out):
  y, order, inverse, gates, n_rows = res
  k = gates.shape[1]
  # In sorted order, with dy = d_out[token of row i]: d y[i] = gate of pair order[i] * dy and
  # d gate = <dy, y[i]>, both 0 from n_rows on (rows the gather leaves unwritten); the gate
  # gradients then go back to pair order by a gather of scalars.
  valid = (jnp.arange(order.shape[0]) < n_rows)[:, None]
  dy = permute_kernels.gather_rows(d_out, order // k, n_rows, interpret=interpret)
  d_y = jnp.where(valid, dy * gates.reshape(-1)[order][:, None].astype(dy.dtype), 0)
  d_gate = jnp.where(valid, dy.astype(jnp.float32) * y.astype(jnp.float32), 0).sum(axis=1)
  return d_y.astype(y.dtype), None, d_gate[inverse].reshape(gates.shape).astype(gates.dtype), None


_combine.defvjp(_combine_fwd, _combine_bwd)
