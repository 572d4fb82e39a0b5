"""Pallas grouped matmul kernels, tiled for TPU (Mosaic) and runnable with interpret=True.

gmm:  out[rows of g] = lhs[rows of g] @ rhs[g]      lhs [m, k], rhs [G, k, n] -> [m, n]
      transpose_rhs: rhs [G, n, k] and out = lhs @ rhs[g]^T (d lhs of the VJP, no copy)
tgmm: out[g] = lhs[rows of g]^T @ dy[rows of g]    lhs [m, k], dy [m, n] -> [G, k, n]

Rows are sorted by group. The row axis is cut into tiles of tm rows; a *visit* is one
(group, row tile) pair that overlap, so a tile straddling a group boundary is visited once
per group and each visit masks the rows that are not its group's. The grid is the static
bound cdiv(m, tm) + G - 1 on the visit count (interpret mode needs a static grid); only the
first `num_visits` (scalar-prefetched, with the group and tile of each visit) multiply.
The others cost no matmul and no copy in: their index maps name the blocks of the last
real visit, which Pallas does not fetch again. gmm spends them zeroing the row tiles past
the last group; tgmm visits an empty group once, to write its zeros.

Rows past sum(group_sizes) (the "no expert" pairs of moe.dispatch.sorting) are multiplied
only as the tail of the last group's last row tile, and selected away there (tgmm masks
them out of lhs): whatever they hold (ops.permute leaves them unwritten) never reaches a
result, and gmm writes them as 0.

Blocks need not divide the arrays: a ragged last block's rows past m and columns past n
are dropped on write-back, and a ragged contraction block is masked on both operands.
Nothing is padded or transposed outside the kernels.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tiling import Tiling, check_dtypes, gmm_tiling, tgmm_tiling

__all__ = ["Tiling", "Visits", "gmm", "make_visits", "max_visits", "tgmm"]


class Visits(NamedTuple):
  group_ids: jax.Array   # [V] int32: the group of each visit
  tile_ids: jax.Array    # [V] int32: the row tile of each visit
  num_visits: jax.Array  # [1] int32: visits that are real (the rest skip their work)
  starts: jax.Array      # [G] int32: first row of each group
  ends: jax.Array        # [G] int32: one past the last row of each group


def max_visits(m: int, num_groups: int, tm: int) -> int:
  return pl.cdiv(m, tm) + num_groups - 1


def make_visits(group_sizes: jax.Array, m: int, tm: int, visit_empty: bool = False) -> Visits:
  """The (group, row tile) visits for m rows sorted by group, in order, padded to max_visits.

  A non-empty group visits every tile it overlaps; with visit_empty an empty group gets one
  visit (tgmm writes its zeros there). Either way at most cdiv(m, tm) + G - 1 visits: every
  group but the first adds at most one tile to the cdiv(m, tm). Past the real visits the
  group repeats the last real one; the tile does too with visit_empty, and otherwise walks
  on through the tiles after the last group's (gmm zeroes them), then stays on the last.
  """
  gs = group_sizes.astype(jnp.int32)
  num_groups = gs.shape[0]
  n_tiles = pl.cdiv(m, tm)
  ends = jnp.cumsum(gs)
  starts = ends - gs
  first_tile = jnp.minimum(starts // tm, n_tiles - 1)
  per_group = jnp.where(gs > 0, (ends - 1) // tm - starts // tm + 1, int(visit_empty))
  cum = jnp.cumsum(per_group)
  total = cum[-1]
  v = jnp.arange(max_visits(m, num_groups, tm), dtype=jnp.int32)
  v_real = jnp.minimum(v, jnp.maximum(total - 1, 0))
  group_ids = jnp.minimum(jnp.searchsorted(cum, v_real, side="right"), num_groups - 1)
  tile_ids = first_tile[group_ids] + v_real - (cum[group_ids] - per_group[group_ids])
  if not visit_empty:  # tiles after the last real visit's (all of them when there is none)
    last = jnp.where(total > 0, tile_ids, -1)
    tile_ids = jnp.where(v < total, tile_ids, jnp.minimum(last + v - total + 1, n_tiles - 1))
  return Visits(group_ids.astype(jnp.int32), tile_ids.astype(jnp.int32),
                total.reshape(1).astype(jnp.int32), starts, ends)


def _row_mask(visits_refs, v, tm):
  """[tm, 1] bool: rows of visit v's tile that belong to its group."""
  group_ids, tile_ids, _, starts, ends = visits_refs
  g = group_ids[v]
  rows = tile_ids[v] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
  return (rows >= starts[g]) & (rows < ends[g])


def _precision(dtype) -> jax.lax.Precision:
  """The MXU pass for inputs of `dtype`, set here rather than by jax_default_matmul_precision:
  Mosaic rejects an f32-precision matmul of bf16 operands ("Bad lhs type"), and bf16
  products are exact in the f32 accumulator anyway."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def _mask_cols(x: jax.Array, axis: int, valid) -> jax.Array:
  """x with the entries at index >= valid along `axis` set to 0 (garbage past a ragged end)."""
  return jnp.where(jax.lax.broadcasted_iota(jnp.int32, x.shape, axis) < valid, x, jnp.zeros_like(x))


@functools.partial(jax.jit, static_argnames=("tiling", "transpose_rhs", "interpret"))
def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, tiling: Tiling | None = None,
        transpose_rhs: bool = False, interpret: bool = False) -> jax.Array:
  """lhs: [m, k] sorted by group, rhs: [G, k, n] ([G, n, k] with transpose_rhs),
  group_sizes: [G] -> [m, n] (lhs dtype). Rows past sum(group_sizes) are zero."""
  check_dtypes("gmm", lhs, rhs)
  m, k = lhs.shape
  num_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if rhs.shape[2 if transpose_rhs else 1] != k:
    raise ValueError(f"gmm: lhs {lhs.shape} and rhs {rhs.shape} (transpose_rhs={transpose_rhs}) "
                     "do not share the contraction axis")
  t = tiling or gmm_tiling(m, k, n, num_groups, lhs.dtype)
  tm, tk, tn = t.tm, min(t.tk, k), min(t.tn, n)
  k_tiles, k_rem = pl.cdiv(k, tk), k % tk
  visits = make_visits(group_sizes, m, tm)
  precision = _precision(lhs.dtype)
  dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  def kernel(group_ids, tile_ids, num_visits, starts, ends, lhs_ref, rhs_ref, out_ref, *acc):
    v, ki = pl.program_id(1), pl.program_id(2)
    refs = (group_ids, tile_ids, num_visits, starts, ends)
    nv = num_visits[0]

    def store(result):
      first = (v == 0) | (tile_ids[v] != tile_ids[jnp.maximum(v - 1, 0)])
      # The first visit of a tile owns it (rows of no group become 0); later visits of
      # the same tile keep what earlier groups wrote there.
      keep = jnp.where(first, jnp.zeros_like(out_ref[...]), out_ref[...])
      out_ref[...] = jnp.where(_row_mask(refs, v, tm), result.astype(out_ref.dtype), keep)

    @pl.when(v < nv)
    def _():
      x, w = lhs_ref[...], rhs_ref[...]
      if k_rem:  # the last contraction block runs past k: zero both sides there
        valid = jnp.where(ki == k_tiles - 1, k_rem, tk)
        x, w = _mask_cols(x, 1, valid), _mask_cols(w, 1 if transpose_rhs else 0, valid)
      part = jax.lax.dot_general(x, w, dims, precision=precision, preferred_element_type=jnp.float32)
      if k_tiles == 1:
        store(part)
        return
      acc_ref, = acc

      @pl.when(ki == 0)
      def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

      acc_ref[...] += part

      @pl.when(ki == k_tiles - 1)
      def _():
        store(acc_ref[...])

    # A skipped visit on a tile past the last real visit's writes that tile's zeros.
    @pl.when((v >= nv) & ((nv == 0) | (tile_ids[v] != tile_ids[jnp.maximum(nv - 1, 0)])))
    def _():
      out_ref[...] = jnp.zeros_like(out_ref)

  def k_block(v, ki, nv):
    # Skipped visits stay on the last real visit's last contraction block: no copy.
    return jnp.where(v < nv[0], ki, k_tiles - 1)

  def rhs_block(ni, v, ki, gid, tid, nv, *_):
    kb = k_block(v, ki, nv)
    return (gid[v], ni, kb) if transpose_rhs else (gid[v], kb, ni)

  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), lhs.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(pl.cdiv(n, tn), visits.group_ids.shape[0], k_tiles),
          in_specs=[
              pl.BlockSpec((tm, tk), lambda ni, v, ki, gid, tid, nv, *_: (tid[v], k_block(v, ki, nv))),
              pl.BlockSpec((None, tn, tk) if transpose_rhs else (None, tk, tn), rhs_block),
          ],
          out_specs=pl.BlockSpec((tm, tn), lambda ni, v, ki, gid, tid, *_: (tid[v], ni)),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)] if k_tiles > 1 else [],
      ),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      cost_estimate=pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                                    bytes_accessed=(m * k + math.prod(rhs.shape) + m * n) * lhs.dtype.itemsize),
  )(*visits, lhs, rhs)
  return out


@functools.partial(jax.jit, static_argnames=("num_groups", "tiling", "interpret"))
def tgmm(lhs: jax.Array, dy: jax.Array, group_sizes: jax.Array, num_groups: int,
         tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
  """lhs: [m, k], dy: [m, n], both sorted by group -> [G, k, n] of lhs_g^T dy_g (f32
  accumulation, lhs dtype). Groups without rows get exactly zero."""
  check_dtypes("tgmm", lhs, dy)
  m, k = lhs.shape
  n = dy.shape[1]
  t = tiling or tgmm_tiling(m, k, n, num_groups, lhs.dtype)
  tm, tk, tn = t.tm, min(t.tk, k), min(t.tn, n)
  visits = make_visits(group_sizes, m, tm, visit_empty=True)
  n_visits = visits.group_ids.shape[0]
  precision = _precision(lhs.dtype)

  def kernel(group_ids, tile_ids, num_visits, starts, ends, lhs_ref, dy_ref, out_ref, acc_ref):
    v = pl.program_id(2)
    nv = num_visits[0]
    g = group_ids[v]
    live = v < nv

    @pl.when(live & ((v == 0) | (g != group_ids[jnp.maximum(v - 1, 0)])))
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(live & (ends[g] > starts[g]))
    def _():
      # Rows of other groups are zeroed in lhs; rows past m in a ragged last tile hold
      # garbage, so there dy is masked too (0 * garbage could be NaN).
      mask = _row_mask((group_ids, tile_ids, num_visits, starts, ends), v, tm)
      x = jnp.where(mask, lhs_ref[...], jnp.zeros_like(lhs_ref[...]))
      d = jnp.where(mask, dy_ref[...], jnp.zeros_like(dy_ref[...])) if m % tm else dy_ref[...]
      acc_ref[...] += jax.lax.dot_general(x, d, (((0,), (0,)), ((), ())), precision=precision,
                                          preferred_element_type=jnp.float32)

    @pl.when(live & ((v == nv - 1) | (g != group_ids[jnp.minimum(v + 1, n_visits - 1)])))
    def _():
      out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), lhs.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(pl.cdiv(k, tk), pl.cdiv(n, tn), n_visits),
          in_specs=[
              pl.BlockSpec((tm, tk), lambda ki, ni, v, gid, tid, *_: (tid[v], ki)),
              pl.BlockSpec((tm, tn), lambda ki, ni, v, gid, tid, *_: (tid[v], ni)),
          ],
          out_specs=pl.BlockSpec((None, tk, tn), lambda ki, ni, v, gid, tid, *_: (gid[v], ki, ni)),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      cost_estimate=pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                                    bytes_accessed=(m * k + m * n + num_groups * k * n) * lhs.dtype.itemsize),
  )(*visits, lhs, dy)
