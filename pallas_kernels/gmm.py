"""Pallas grouped matmul kernels, tiled for TPU (Mosaic) and runnable with interpret=True.

gmm:  out[m, n] = lhs[rows of group g] @ rhs[g]      lhs [m, k], rhs [G, k, n]
tgmm: out[G, k, n] = lhs[rows of g]^T @ dy[rows of g]  lhs [m, k], dy [m, n]

Rows are sorted by group. The row axis is cut into tiles of tm rows; a *visit* is one
(group, row tile) pair that overlap, so a tile straddling a group boundary is visited
once per group and each visit masks the rows that are not its group's. There are at most
cdiv(m, tm) + G - 1 visits: the grid is that static bound. Visits past the real count
(scalar-prefetched) do nothing: their block indices repeat the last real step's, so no
block is fetched again, and `pl.when` skips their matmul and store. Under expert
parallelism most of the bound is such visits (a receive buffer sized for the worst case
holds few real rows), so they must cost nothing. Visit metadata (group and tile of each
visit, the real count) drives the BlockSpec index maps.

gmm(..., transpose_rhs=True) multiplies by each rhs[g]^T ([G, n, k] stored), the VJP's
d lhs = dy @ rhs^T, without a transposed copy of every expert's weights.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Tile sizes per pass: rows (tm), contraction (tk), output columns (tn)."""
  tm: int = 128
  tk: int = 128
  tn: int = 128


DTYPES = (jnp.float32, jnp.bfloat16)


def _check_dtypes(*arrays) -> None:
  dtypes = {a.dtype for a in arrays}
  if len(dtypes) != 1 or not dtypes <= set(map(jnp.dtype, DTYPES)):
    raise TypeError(f"grouped matmul operands must share one dtype of "
                    f"{[jnp.dtype(t).name for t in DTYPES]}, got {sorted(d.name for d in dtypes)}")


def _lane_tile(dim: int) -> int:
  """The largest of 512, 256, 128 that divides `dim` (which is then not padded); a dim
  under 128 is one tile; else 128 (the MXU's width) with the dim padded to it."""
  if dim < 128:
    return dim
  return next((t for t in (512, 256, 128) if dim % t == 0), 128)


def tiling_for(m: int, k: int, n: int, dtype) -> Tiling:
  """Tile sizes for lhs [m, k] x rhs [G, k, n], by a written rule:
  - tk, tn: wide tiles amortise the per-step overhead and feed the 128- or 256-wide MXU;
    the largest of 512/256/128 that divides the dim avoids padding (_lane_tile). Three
    buffers of 512 x 512 bf16 stay far below VMEM.
  - tm = 128 rows: a tile straddling a group boundary is visited once per group, so the
    row tile bounds the waste per group (G x tm rows at most); m under 128 rounds up to
    the sublane multiple (8 rows of 32-bit, 16 of 16-bit)."""
  sublane = 8 * (4 // jnp.dtype(dtype).itemsize)
  tm = 128 if m >= 128 else -(-m // sublane) * sublane
  return Tiling(tm, _lane_tile(k), _lane_tile(n))


class Visits(NamedTuple):
  group_ids: jax.Array   # [V] int32: the group of each visit
  tile_ids: jax.Array    # [V] int32: the row tile of each visit
  num_visits: jax.Array  # [1] int32: visits that are real (the rest are masked repeats)
  starts: jax.Array      # [G] int32: first row of each group
  ends: jax.Array        # [G] int32: one past the last row of each group


def max_visits(m: int, num_groups: int, tm: int) -> int:
  return pl.cdiv(m, tm) + num_groups - 1


def make_visits(group_sizes: jax.Array, m: int, tm: int) -> Visits:
  """The (group, row tile) visit list for rows sorted by group, padded to max_visits."""
  gs = group_sizes.astype(jnp.int32)
  num_groups = gs.shape[0]
  ends = jnp.cumsum(gs)
  starts = ends - gs
  per_group = jnp.where(gs > 0, (ends - 1) // tm - starts // tm + 1, 0)
  cum = jnp.cumsum(per_group)
  total = cum[-1]
  v = jnp.arange(max_visits(m, num_groups, tm), dtype=jnp.int32)
  # Past the real visits, repeat the last real one (masked in the kernels).
  v_real = jnp.minimum(v, jnp.maximum(total - 1, 0))
  group_ids = jnp.minimum(jnp.searchsorted(cum, v_real, side="right"), num_groups - 1).astype(jnp.int32)
  tile_ids = (starts[group_ids] // tm + v_real - (cum[group_ids] - per_group[group_ids])).astype(jnp.int32)
  tile_ids = jnp.where(total > 0, tile_ids, 0)
  return Visits(group_ids, tile_ids, total.reshape(1).astype(jnp.int32), starts, ends)


def _row_mask(visits_refs, v, tm):
  """[tm, 1] bool: rows of visit v's tile that belong to its group (False past the end)."""
  group_ids, tile_ids, num_visits, starts, ends = visits_refs
  g = group_ids[v]
  rows = tile_ids[v] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
  return (rows >= starts[g]) & (rows < ends[g]) & (v < num_visits[0])


def _precision(dtype) -> jax.lax.Precision:
  """The MXU pass for inputs of `dtype`, set here rather than by jax_default_matmul_precision:
  Mosaic rejects an f32-precision matmul of bf16 operands ("Bad lhs type"), and bf16
  products are exact in the f32 accumulator anyway."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  pad = (-x.shape[axis]) % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


@functools.partial(jax.jit, static_argnames=("tiling", "interpret", "transpose_rhs"))
def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, tiling: Tiling | None = None,
        interpret: bool = False, transpose_rhs: bool = False) -> jax.Array:
  """lhs: [m, k] sorted by group, rhs: [G, k, n] ([G, n, k] with transpose_rhs: each
  group's matrix used transposed), group_sizes: [G] -> [m, n] (lhs dtype).

  Rows past sum(group_sizes) are zero.
  """
  _check_dtypes(lhs, rhs)
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tiling = tiling or tiling_for(m, k, n, lhs.dtype)
  tm, tk, tn = tiling.tm, min(tiling.tk, k), min(tiling.tn, n)
  lhs_p = _pad_to(_pad_to(lhs, 0, tm), 1, tk)
  rhs_p = _pad_to(_pad_to(rhs, 1, tn), 2, tk) if transpose_rhs else _pad_to(_pad_to(rhs, 1, tk), 2, tn)
  mp, kp = lhs_p.shape
  np_ = rhs_p.shape[1] if transpose_rhs else rhs_p.shape[2]
  visits = make_visits(group_sizes, mp, tm)
  n_visits = visits.group_ids.shape[0]
  k_tiles = kp // tk
  contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  def kernel(group_ids, tile_ids, num_visits, starts, ends, lhs_ref, rhs_ref, out_ref, acc_ref):
    v, ki = pl.program_id(1), pl.program_id(2)

    @pl.when((ki == 0) & (v < num_visits[0]))
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(v < num_visits[0])
    def _():
      acc_ref[...] += jax.lax.dot_general(lhs_ref[...], rhs_ref[...], contract,
                                          precision=_precision(lhs.dtype),
                                          preferred_element_type=jnp.float32)

    @pl.when((ki == k_tiles - 1) & (v < num_visits[0]))
    def _():
      mask = _row_mask((group_ids, tile_ids, num_visits, starts, ends), v, tm)
      first = (v == 0) | (tile_ids[v] != tile_ids[jnp.maximum(v - 1, 0)])
      # The first visit of a tile owns it (rows of no group become 0); later visits of
      # the same tile keep what earlier groups wrote.
      keep = jnp.where(first, jnp.zeros_like(out_ref[...]), out_ref[...])
      out_ref[...] = jnp.where(mask, acc_ref[...].astype(out_ref.dtype), keep)

  # Past the real visits, stay on the last real step's blocks: nothing is fetched again.
  kk = lambda v, ki, nv: jnp.where(v < nv[0], ki, k_tiles - 1)
  rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  rhs_index = ((lambda ni, v, ki, gid, tid, nv, *_: (gid[v], ni, kk(v, ki, nv))) if transpose_rhs
               else (lambda ni, v, ki, gid, tid, nv, *_: (gid[v], kk(v, ki, nv), ni)))
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, np_), lhs.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(np_ // tn, n_visits, k_tiles),
          in_specs=[
              pl.BlockSpec((tm, tk), lambda ni, v, ki, gid, tid, nv, *_: (tid[v], kk(v, ki, nv))),
              pl.BlockSpec(rhs_block, rhs_index),
          ],
          out_specs=pl.BlockSpec((tm, tn), lambda ni, v, ki, gid, tid, *_: (tid[v], ni)),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
  )(*visits, lhs_p, rhs_p)
  out = out[:m, :n]
  # Tiles no group touches are never written: define rows past the last group as zero.
  return jnp.where((jnp.arange(m) < visits.ends[-1])[:, None], out, 0).astype(lhs.dtype)


@functools.partial(jax.jit, static_argnames=("num_groups", "tiling", "interpret"))
def tgmm(lhs: jax.Array, dy: jax.Array, group_sizes: jax.Array, num_groups: int,
         tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
  """lhs: [m, k], dy: [m, n], both sorted by group -> [G, k, n] of lhs_g^T dy_g (f32
  accumulation, lhs dtype). Groups without rows get exactly zero."""
  _check_dtypes(lhs, dy)
  m, k = lhs.shape
  n = dy.shape[1]
  tiling = tiling or tiling_for(m, k, n, lhs.dtype)
  tm, tk, tn = tiling.tm, min(tiling.tk, k), min(tiling.tn, n)
  lhs_p = _pad_to(_pad_to(lhs, 0, tm), 1, tk)
  dy_p = _pad_to(_pad_to(dy, 0, tm), 1, tn)
  mp, kp = lhs_p.shape
  np_ = dy_p.shape[1]
  visits = make_visits(group_sizes, mp, tm)
  n_visits = visits.group_ids.shape[0]

  def kernel(group_ids, tile_ids, num_visits, starts, ends, lhs_ref, dy_ref, out_ref, acc_ref):
    v = pl.program_id(2)
    g = group_ids[v]

    @pl.when((v == 0) | (g != group_ids[jnp.maximum(v - 1, 0)]))
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(v < num_visits[0])  # visits past the real count add nothing
    def _():
      mask = _row_mask((group_ids, tile_ids, num_visits, starts, ends), v, tm)
      x = jnp.where(mask, lhs_ref[...], jnp.zeros_like(lhs_ref[...]))
      acc_ref[...] += jax.lax.dot_general(x, dy_ref[...], (((0,), (0,)), ((), ())),
                                          precision=_precision(lhs.dtype),
                                          preferred_element_type=jnp.float32)

    @pl.when((v == n_visits - 1) | (g != group_ids[jnp.minimum(v + 1, n_visits - 1)]))
    def _():
      out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), lhs.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(kp // tk, np_ // tn, n_visits),
          in_specs=[
              pl.BlockSpec((tm, tk), lambda ki, ni, v, gid, tid, *_: (tid[v], ki)),
              pl.BlockSpec((tm, tn), lambda ki, ni, v, gid, tid, *_: (tid[v], ni)),
          ],
          out_specs=pl.BlockSpec((None, tk, tn), lambda ki, ni, v, gid, tid, *_: (gid[v], ki, ni)),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(*visits, lhs_p, dy_p)
  out = out[:, :k, :n]
  # Groups with no rows are never visited: their blocks are defined as zero here.
  return jnp.where((group_sizes > 0)[:, None, None], out, 0).astype(lhs.dtype)
