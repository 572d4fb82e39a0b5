"""Plain-JAX references for the kernels: what each computes, written the obvious way."""

from __future__ import annotations

import jax.numpy as jnp


def gmm(lhs, rhs, group_sizes):
  """Each row times its group's matrix; rows past the last group are zero."""
  m = lhs.shape[0]
  group_of_row = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(m), side="right")
  inside = group_of_row < rhs.shape[0]
  # Cast before gathering, so autodiff accumulates weight gradients in f32 too.
  w = rhs.astype(jnp.float32)[jnp.minimum(group_of_row, rhs.shape[0] - 1)]  # [m, k, n]
  out = jnp.einsum("mk,mkn->mn", lhs.astype(jnp.float32), w)
  return jnp.where(inside[:, None], out, 0).astype(lhs.dtype)


def tgmm(lhs, dy, group_sizes, num_groups):
  m = lhs.shape[0]
  group_of_row = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(m), side="right")
  onehot = (group_of_row[:, None] == jnp.arange(num_groups)[None]).astype(jnp.float32)  # [m, G]
  out = jnp.einsum("mg,mk,mn->gkn", onehot, lhs.astype(jnp.float32), dy.astype(jnp.float32))
  return out.astype(lhs.dtype)


def gather_rows(x, src):
  return x[src]


def combine_rows(y, src, weights):
  t, j = weights.shape
  rows = y[src].reshape(t, j, -1).astype(jnp.float32)
  return jnp.einsum("tjd,tj->td", rows, weights.astype(jnp.float32)).astype(y.dtype)
