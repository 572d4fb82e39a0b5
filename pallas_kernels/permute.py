"""Pallas token gather/scatter kernels for dropless MoE dispatch (TPU; interpretable).

gather_rows:  out[r] = x[src[r]]                              x [T, d], src [R] -> [R, d]
combine_rows: out[t] = sum_j w[t, j] * y[src[t * J + j]]      y [R, d], src [T*J], w [T, J] -> [T, d]

Both copy single rows by DMA with scalar-prefetched indices. Mosaic only slices a tiled
dimension at multiples of its tile, and a DMA may only move single rows of 32-bit data:
16-bit rows are packed two per sublane. So rows travel as 32-bit words (bf16 pairs of
adjacent columns packed into one uint32: `_to_words`; an odd width gains a zero column), and
  gather_rows  copies rows HBM -> HBM (the output stays in HBM; no VMEM tile is sliced);
  combine_rows copies rows into a VMEM scratch [n, 1, d] whose row axis is a leading,
               untiled axis, sums each token's J rows in f32 and stores [block_rows, d]
               (bf16 words unpacked and re-packed in the kernel; f16 rows, which Mosaic
               cannot unpack, are combined as f32).
Permuting tokens into expert order is gather_rows with src = sorted pair // K; combining
expert outputs back is combine_rows with the inverse permutation and the gates. Both
directions are gathers, so each is the other's VJP (ops.py): no scatter-add anywhere.

"No expert" pairs sort after every group (moe.dispatch.sorting), and no DMA moves them:
gather_rows(n_rows) copies only the first n_rows output rows (the pairs with an expert),
combine_rows(n_src) reads only source rows below n_src (a pair sorted past them adds 0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

SUPPORTED = (jnp.float32, jnp.bfloat16, jnp.float16)


def _to_words(x: jax.Array) -> jax.Array:
  """[n, d] -> [n, d] (32-bit) or [n, ceil(d / 2)] uint32 (16-bit: columns 2i, 2i+1 in one
  word; an odd d gets a zero column to fill its last word)."""
  if x.dtype not in SUPPORTED:
    raise TypeError(f"row kernels take {[jnp.dtype(t).name for t in SUPPORTED]}, not {x.dtype}")
  if x.dtype.itemsize == 4:
    return x
  x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2)))
  return jax.lax.bitcast_convert_type(x.reshape(x.shape[0], -1, 2), jnp.uint32)


def _from_words(w: jax.Array, dtype, d: int) -> jax.Array:
  """The inverse of _to_words for rows of width d."""
  if jnp.dtype(dtype).itemsize == 4:
    return w
  return jax.lax.bitcast_convert_type(w, dtype).reshape(w.shape[0], -1)[:, :d]


def _bf16_halves(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """uint32 words of bf16 pairs -> (even columns, odd columns) in f32: a bf16 is the top
  half of the f32 with its bits."""
  lo = jax.lax.bitcast_convert_type(w << 16, jnp.float32)
  hi = jax.lax.bitcast_convert_type(w & jnp.uint32(0xFFFF0000), jnp.float32)
  return lo, hi


def _bf16_word(lo: jax.Array, hi: jax.Array) -> jax.Array:
  """f32 (even, odd) columns -> uint32 words of the bf16 pair, rounded to nearest even."""
  def bits(v):
    u = jax.lax.bitcast_convert_type(v, jnp.uint32)
    return (u + jnp.uint32(0x7FFF) + ((u >> 16) & jnp.uint32(1))) >> 16
  return bits(lo) | (bits(hi) << 16)


def _copy(src, dst, sem, count):
  """count (static or traced) row DMAs src(i) -> dst(i), all in flight, then all waited."""
  jax.lax.fori_loop(0, count, lambda i, _: pltpu.make_async_copy(src(i), dst(i), sem).start(), None)
  jax.lax.fori_loop(0, count, lambda i, _: pltpu.make_async_copy(src(0), dst(i), sem).wait(), None)


@functools.partial(jax.jit, static_argnames=("block_rows", "interpret"))
def gather_rows(x: jax.Array, src: jax.Array, n_rows: jax.Array | None = None, block_rows: int = 8,
                interpret: bool = False) -> jax.Array:
  """x: [T, d], src: [R] int in [0, T) -> [R, d] with out[r] = x[src[r]] for r < n_rows
  (default R); rows from n_rows on are not written: undefined (NaN in interpret mode)."""
  words = _to_words(x)
  n_out = src.shape[0]
  pad = (-n_out) % block_rows
  src_p = jnp.pad(src.astype(jnp.int32), (0, pad))  # padded rows are never copied
  limit = jnp.minimum(jnp.asarray(n_out if n_rows is None else n_rows, jnp.int32), n_out).reshape(1)

  def kernel(src_ref, limit_ref, x_hbm, out_hbm, sem):
    base = pl.program_id(0) * block_rows
    count = jnp.clip(limit_ref[0] - base, 0, block_rows)  # this block's rows below the limit
    _copy(lambda i: x_hbm.at[pl.ds(src_ref[base + i], 1)], lambda i: out_hbm.at[pl.ds(base + i, 1)],
          sem, count)

  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((n_out + pad, words.shape[1]), words.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=((n_out + pad) // block_rows,),
          in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=pl.BlockSpec(memory_space=pl.ANY),
          scratch_shapes=[pltpu.SemaphoreType.DMA],
      ),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=interpret,
  )(src_p, limit, words)
  return _from_words(out[:n_out], x.dtype, x.shape[1])


@functools.partial(jax.jit, static_argnames=("block_rows", "interpret"))
def combine_rows(y: jax.Array, src: jax.Array, weights: jax.Array, n_src: jax.Array | None = None,
                 block_rows: int = 8, interpret: bool = False) -> jax.Array:
  """y: [R, d], src: [T*J] int in [0, R), weights: [T, J] -> [T, d] (f32 accumulation).
  Only rows y[:n_src] (default all R) are read: an entry with src >= n_src adds 0."""
  if y.dtype == jnp.float16:  # Mosaic cannot unpack f16 pairs in the kernel: sum in f32
    return combine_rows(y.astype(jnp.float32), src, weights, n_src, block_rows, interpret).astype(y.dtype)
  words = _to_words(y)
  n_tok, j = weights.shape
  pad = (-n_tok) % block_rows
  src_p = jnp.pad(src.astype(jnp.int32), (0, pad * j))
  w_p = jnp.pad(weights.astype(jnp.float32), ((0, pad), (0, 0)))
  limit = jnp.asarray(y.shape[0] if n_src is None else n_src, jnp.int32).reshape(1)
  packed = y.dtype.itemsize == 2
  n, width = block_rows * j, words.shape[1]

  def kernel(src_ref, limit_ref, w_ref, y_hbm, out_ref, buf, sem):
    base = pl.program_id(0) * n
    live = lambda i: src_ref[base + i] < limit_ref[0]

    def start(i, _):
      @pl.when(live(i))
      def _():
        pltpu.make_async_copy(y_hbm.at[pl.ds(src_ref[base + i], 1)], buf.at[i], sem).start()

      # A row not read is a zero row: the scratch holds stale (or never written) data.
      @pl.when(jnp.logical_not(live(i)))
      def _():
        buf[i] = jnp.zeros((1, width), words.dtype)

    def wait(i, _):
      @pl.when(live(i))
      def _():
        pltpu.make_async_copy(y_hbm.at[pl.ds(0, 1)], buf.at[i], sem).wait()

    jax.lax.fori_loop(0, n, start, None)
    jax.lax.fori_loop(0, n, wait, None)
    w = w_ref[...]
    out = []
    for b in range(block_rows):  # static: rows of the block, each a sum of its J rows
      parts = None
      for c in range(j):
        row = buf[b * j + c]                                            # [1, width]
        row = _bf16_halves(row) if packed else (row.astype(jnp.float32),)
        scaled = tuple(p * w[b:b + 1, c:c + 1] for p in row)
        parts = scaled if parts is None else tuple(a + s for a, s in zip(parts, scaled))
      out.append(_bf16_word(*parts) if packed else parts[0].astype(y.dtype))
    out_ref[...] = jnp.concatenate(out, axis=0)

  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((n_tok + pad, width), words.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=((n_tok + pad) // block_rows,),
          in_specs=[pl.BlockSpec((block_rows, j), lambda i, *_: (i, 0)),
                    pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=pl.BlockSpec((block_rows, width), lambda i, *_: (i, 0)),
          scratch_shapes=[pltpu.VMEM((n, 1, width), words.dtype), pltpu.SemaphoreType.DMA],
      ),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=interpret,
  )(src_p, limit, w_p, words)
  return _from_words(out[:n_tok], y.dtype, y.shape[1])
