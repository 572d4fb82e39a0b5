"""Pallas token gather/scatter kernels for dropless MoE dispatch (TPU-style, interpretable).

gather_rows:  out[r] = x[src[r]]                              x [T, d], src [R] -> [R, d]
combine_rows: out[t] = sum_j w[t, j] * y[src[t * J + j]]      y [R, d], src [T*J], w [T, J] -> [T, d]

Rows are copied by DMA from x / y, which stay in HBM (memory space ANY), into a VMEM block
of `block_rows` output rows; the indices are scalar-prefetched. Permuting tokens into
expert order is gather_rows with src = sorted pair // K; combining expert outputs back is
combine_rows with the inverse permutation and the gates. Both directions are gathers, so
each is the other's VJP (see ops.py): no scatter-add over a dense buffer anywhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _copy_rows(src_ref, x_hbm, buf, sem, base, count):
  """DMA rows x[src[base + i]] into buf[i] for i < count; all in flight, then waited."""
  def start(i, _):
    pltpu.make_async_copy(x_hbm.at[pl.ds(src_ref[base + i], 1)], buf.at[pl.ds(i, 1)], sem).start()

  def wait(i, _):
    pltpu.make_async_copy(x_hbm.at[pl.ds(0, 1)], buf.at[pl.ds(i, 1)], sem).wait()

  jax.lax.fori_loop(0, count, start, None)
  jax.lax.fori_loop(0, count, wait, None)


@functools.partial(jax.jit, static_argnames=("block_rows", "interpret"))
def gather_rows(x: jax.Array, src: jax.Array, block_rows: int = 8, interpret: bool = False) -> jax.Array:
  """x: [T, d], src: [R] int in [0, T) -> [R, d] with out[r] = x[src[r]]."""
  n_out = src.shape[0]
  d = x.shape[1]
  pad = (-n_out) % block_rows
  src_p = jnp.pad(src.astype(jnp.int32), (0, pad))  # padded rows copy row 0, then are cut

  def kernel(src_ref, x_hbm, out_ref, sem):
    base = pl.program_id(0) * block_rows
    _copy_rows(src_ref, x_hbm, out_ref, sem, base, block_rows)

  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((n_out + pad, d), x.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=((n_out + pad) // block_rows,),
          in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=pl.BlockSpec((block_rows, d), lambda i, src: (i, 0)),
          scratch_shapes=[pltpu.SemaphoreType.DMA],
      ),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=interpret,
  )(src_p, x)
  return out[:n_out]


@functools.partial(jax.jit, static_argnames=("block_rows", "interpret"))
def combine_rows(y: jax.Array, src: jax.Array, weights: jax.Array, block_rows: int = 8,
                 interpret: bool = False) -> jax.Array:
  """y: [R, d], src: [T*J] int in [0, R), weights: [T, J] -> [T, d] (f32 accumulation)."""
  n_tok, j = weights.shape
  d = y.shape[1]
  pad = (-n_tok) % block_rows
  src_p = jnp.pad(src.astype(jnp.int32), (0, pad * j))
  w_p = jnp.pad(weights.astype(jnp.float32), ((0, pad), (0, 0)))

  def kernel(src_ref, w_ref, y_hbm, out_ref, buf, sem):
    base = pl.program_id(0) * block_rows * j
    _copy_rows(src_ref, y_hbm, buf, sem, base, block_rows * j)
    rows = buf[...].astype(jnp.float32).reshape(block_rows, j, d)
    out_ref[...] = jnp.sum(rows * w_ref[...][:, :, None], axis=1).astype(out_ref.dtype)

  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((n_tok + pad, d), y.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=((n_tok + pad) // block_rows,),
          in_specs=[pl.BlockSpec((block_rows, j), lambda i, src: (i, 0)),
                    pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=pl.BlockSpec((block_rows, d), lambda i, src: (i, 0)),
          scratch_shapes=[pltpu.VMEM((block_rows * j, d), y.dtype), pltpu.SemaphoreType.DMA],
      ),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=interpret,
  )(src_p, w_p, y)
  return out[:n_tok]
