"""The XLA grouped matmul (moe.dispatch.tiled_gmm), which runs expert parallelism's local
matmuls on CPU and GPU, against a numpy loop over groups: forward and VJP, group sizes
fuzzed (empty groups, one group holding all rows, rows past the last group) with a row
tile small enough that groups span several tiles and end inside one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, strategies as st

from moe.dispatch import tiled_gmm
from tests.test_pallas_kernels import FUZZ, G, K, M, N, group_sizes

TM = 4  # M = 44 rows: groups of up to 44 rows span up to 11 tiles


def numpy_gmm(lhs, rhs, sizes):
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for g, size in enumerate(sizes):
    out[start:start + size] = lhs[start:start + size] @ rhs[g]
    start += size
  return out  # rows past sum(sizes) stay zero


def numpy_tgmm(lhs, dy, sizes):
  out = np.zeros((len(sizes), lhs.shape[1], dy.shape[1]))
  start = 0
  for g, size in enumerate(sizes):
    out[g] = lhs[start:start + size].T @ dy[start:start + size]
    start += size
  return out


@functools.partial(jax.jit, static_argnums=3)
def gmm_and_vjp(lhs, rhs, sizes, tm, dy):
  out, vjp = jax.vjp(lambda a, b: tiled_gmm.gmm(a, b, sizes, tm), lhs, rhs)
  return out, *vjp(dy)


def operands(seed):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((M, K)), rng.standard_normal((G, K, N)), rng.standard_normal((M, N)))


@FUZZ
@given(sizes=group_sizes(), seed=st.integers(0, 3))
def test_gmm_forward_and_vjp_match_a_loop_over_groups(sizes, seed):
  lhs, rhs, dy = operands(seed)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  out, d_lhs, d_rhs = gmm_and_vjp(f32(lhs), f32(rhs), jnp.asarray(sizes, jnp.int32), TM, f32(dy))
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-4)
  close(out, numpy_gmm(lhs, rhs, sizes))
  # d lhs: each row's cotangent times its group's matrix transposed (zero past the groups).
  close(d_lhs, numpy_gmm(dy, np.swapaxes(rhs, 1, 2), sizes))
  close(d_rhs, numpy_tgmm(lhs, dy, sizes))  # empty groups get exact zeros
  for g in np.flatnonzero(sizes == 0):
    assert not np.any(np.asarray(d_rhs[g]))


@FUZZ
@given(sizes=group_sizes(), seed=st.integers(0, 3))
def test_tgmm_matches_a_loop_over_groups(sizes, seed):
  lhs, _, dy = operands(seed)
  out = jax.jit(tiled_gmm.tgmm, static_argnums=(3, 4))(
      jnp.asarray(lhs, jnp.float32), jnp.asarray(dy, jnp.float32), jnp.asarray(sizes), G, TM)
  np.testing.assert_allclose(np.asarray(out), numpy_tgmm(lhs, dy, sizes), rtol=1e-4, atol=1e-4)


def test_tile_size_does_not_change_the_result():
  lhs, rhs, dy = operands(7)
  sizes = np.array([13, 0, 20, 1, 6])  # 40 of 44 rows: the last 4 belong to no group
  args = (jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32), jnp.asarray(sizes))
  results = [gmm_and_vjp(*args, tm, jnp.asarray(dy, jnp.float32)) for tm in (1, 4, 8, 64)]
  for r in results[1:]:
    for a, b in zip(r, results[0]):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert not np.any(np.asarray(results[0][0][40:]))
