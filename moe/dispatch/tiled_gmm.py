"""Grouped matmul in plain JAX/XLA: a loop over groups and row tiles, no G-fold work.

`gmm(lhs [m, k], rhs [G, k, n], group_sizes [G]) -> [m, n]` multiplies the rows of each
group (contiguous, in group order) by that group's matrix. `tgmm(lhs [m, k], dy [m, n],
group_sizes) -> [G, k, n]` is the transposed form for weight gradients. The loops run
ceil(size_g / tm) tile matmuls per group, about m / tm + G in all, where XLA's ragged_dot
on CPU does G full [m, k] x [k, n] products. Gradients are wired with custom_vjp, as
loops with data-dependent trip counts are not differentiable.

Rows past sum(group_sizes) ("no expert" pairs, moe.dispatch.sorting) are in no group's
tiles: no pass multiplies them, except as the padding (under tm rows) of the last group's
last tile; gmm sets them to 0 and tgmm masks them out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _offsets(group_sizes: jax.Array) -> jax.Array:
  """Start row of each group, [G]."""
  return jnp.cumsum(group_sizes) - group_sizes


def _gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, tm: int) -> jax.Array:
  m, k = lhs.shape
  n = rhs.shape[2]
  starts = _offsets(group_sizes)
  # One spare tile of rows so a tile starting near the end is never clamped by XLA.
  lhs = jnp.concatenate([lhs, jnp.zeros((tm, k), lhs.dtype)])
  out = jnp.zeros((m + tm, n), lhs.dtype)

  def group(g, out):
    w = rhs[g]

    def tile(t, out):
      r0 = starts[g] + t * tm
      y = jnp.dot(jax.lax.dynamic_slice_in_dim(lhs, r0, tm), w, preferred_element_type=jnp.float32)
      # Rows past the group's end belong to later groups, which overwrite them later.
      return jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), r0, axis=0)

    return jax.lax.fori_loop(0, (group_sizes[g] + tm - 1) // tm, tile, out)

  out = jax.lax.fori_loop(0, rhs.shape[0], group, out)[:m]
  # Rows past the last group got a neighbour's overflow: they are defined as zero.
  return jnp.where((jnp.arange(m) < jnp.sum(group_sizes))[:, None], out, 0)


def _tgmm(lhs: jax.Array, dy: jax.Array, group_sizes: jax.Array, num_groups: int, tm: int) -> jax.Array:
  m, k = lhs.shape
  n = dy.shape[1]
  starts = _offsets(group_sizes)
  lhs = jnp.concatenate([lhs, jnp.zeros((tm, k), lhs.dtype)])
  dy = jnp.concatenate([dy, jnp.zeros((tm, n), dy.dtype)])

  def group(g, out):
    def tile(t, acc):
      r0 = starts[g] + t * tm
      inside = (jnp.arange(tm) < group_sizes[g] - t * tm)[:, None]
      x = jnp.where(inside, jax.lax.dynamic_slice_in_dim(lhs, r0, tm), 0)
      return acc + jnp.dot(x.T, jax.lax.dynamic_slice_in_dim(dy, r0, tm),
                           preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, (group_sizes[g] + tm - 1) // tm, tile, jnp.zeros((k, n), jnp.float32))
    return out.at[g].set(acc.astype(out.dtype))

  return jax.lax.fori_loop(0, num_groups, group, jnp.zeros((num_groups, k, n), lhs.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, tm: int = 128) -> jax.Array:
  """lhs: [m, k] rows sorted by group, rhs: [G, k, n], group_sizes: [G] int -> [m, n]."""
  return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), tm)


def _gmm_fwd(lhs, rhs, group_sizes, tm):
  return gmm(lhs, rhs, group_sizes, tm), (lhs, rhs, group_sizes)


def _gmm_bwd(tm, res, dy):
  lhs, rhs, group_sizes = res
  gs = group_sizes.astype(jnp.int32)
  d_lhs = _gmm(dy, jnp.swapaxes(rhs, 1, 2), gs, tm)
  d_rhs = _tgmm(lhs, dy, gs, rhs.shape[0], tm)
  return d_lhs, d_rhs, None


gmm.defvjp(_gmm_fwd, _gmm_bwd)


def tgmm(lhs: jax.Array, dy: jax.Array, group_sizes: jax.Array, num_groups: int, tm: int = 128) -> jax.Array:
  """lhs: [m, k], dy: [m, n], both sorted by group -> per-group lhs_g^T dy_g, [G, k, n]."""
  return _tgmm(lhs, dy, group_sizes.astype(jnp.int32), num_groups, tm)
