"""Pallas kernels (interpret mode) against plain-JAX references, forward and VJP, with
group sizes fuzzed by hypothesis: empty groups, one group holding everything, rows past
the last group, m not a multiple of the row tile, f32 and bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pallas_kernels import ops, reference
from pallas_kernels.gmm import Tiling, make_visits, max_visits

M, K, N, G = 44, 24, 20, 5          # m not a multiple of tm=16; k, n not multiples of 16
TILING = Tiling(tm=16, tk=16, tn=16)
# Relative to the largest reference magnitude: bf16 keeps 8 bits of mantissa.
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1e-2}
FUZZ = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def group_sizes(draw):
  """G sizes summing to at most M; often with empty groups or one group holding all."""
  kind = draw(st.sampled_from(["random", "one_group", "with_empty", "short"]))
  if kind == "one_group":
    sizes = [0] * G
    sizes[draw(st.integers(0, G - 1))] = M
    return np.array(sizes)
  cuts = sorted(draw(st.lists(st.integers(0, M), min_size=G - 1, max_size=G - 1)))
  total = M if kind != "short" else draw(st.integers(0, M))
  sizes = np.diff([0, *[min(c, total) for c in cuts], total])
  if kind == "with_empty":  # move one group's rows to its neighbour
    i = draw(st.integers(0, G - 1))
    sizes[(i + 1) % G] += sizes[i]
    sizes[i] = 0
  return sizes


def operands(seed, dtype):
  ks = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(ks[0], (M, K), jnp.float32).astype(dtype)
  rhs = jax.random.normal(ks[1], (G, K, N), jnp.float32).astype(dtype)
  dy = jax.random.normal(ks[2], (M, N), jnp.float32).astype(dtype)
  return lhs, rhs, dy


def assert_close(a, b, dtype):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
  np.testing.assert_allclose(a, b, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@FUZZ
@given(sizes=group_sizes(), seed=st.integers(0, 3))
def test_gmm_forward_and_vjp_match_reference(dtype, sizes, seed):
  lhs, rhs, dy = operands(seed, dtype)
  gs = jnp.asarray(sizes, jnp.int32)
  out, vjp = jax.vjp(lambda a, b: ops.gmm(a, b, gs, TILING, True), lhs, rhs)
  ref, ref_vjp = jax.vjp(lambda a, b: reference.gmm(a, b, gs), lhs, rhs)
  assert out.dtype == dtype
  assert_close(out, ref, dtype)
  (d_lhs, d_rhs), (r_lhs, r_rhs) = vjp(dy), ref_vjp(dy)
  assert_close(d_lhs, r_lhs, dtype)
  assert_close(d_rhs, r_rhs, dtype)
  empty = np.flatnonzero(sizes == 0)
  assert not np.any(np.asarray(d_rhs, np.float32)[empty]), "empty groups must get exactly zero"
  assert not np.any(np.asarray(out, np.float32)[sizes.sum():]), "rows past the groups are zero"


@FUZZ
@given(sizes=group_sizes(), seed=st.integers(0, 3))
def test_tgmm_matches_reference(sizes, seed):
  lhs, _, dy = operands(seed, jnp.float32)
  gs = jnp.asarray(sizes, jnp.int32)
  from pallas_kernels import gmm as kernels
  out = kernels.tgmm(lhs, dy, gs, G, tiling=TILING, interpret=True)
  assert_close(out, reference.tgmm(lhs, dy, gs, G), jnp.float32)


def test_visit_count_bound():
  # Every group boundary inside a tile costs one extra visit, never more.
  for sizes in ([5, 0, 17, 3, 19], [44, 0, 0, 0, 0], [0] * 5, [1] * 5):
    v = make_visits(jnp.asarray(sizes), 48, 16)
    assert int(v.num_visits[0]) <= max_visits(48, 5, 16)
    assert v.group_ids.shape == (max_visits(48, 5, 16),)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@FUZZ
@given(k=st.sampled_from([1, 3]), n_tokens=st.sampled_from([5, 13]), seed=st.integers(0, 99))
def test_permute_and_combine_match_reference(dtype, k, n_tokens, seed):
  rng = np.random.default_rng(seed)
  d = 16
  x = jnp.asarray(rng.normal(size=(n_tokens, d)), dtype)
  experts = rng.integers(0, 4, n_tokens * k)
  order = jnp.asarray(np.argsort(experts, kind="stable"), jnp.int32)
  gates = jnp.asarray(rng.uniform(size=(n_tokens, k)), dtype)
  rows, vjp = jax.vjp(lambda x: ops.permute(x, order, k, True), x)
  ref_rows, ref_vjp = jax.vjp(lambda x: reference.gather_rows(x, order // k), x)
  assert_close(rows, ref_rows, dtype)
  d_rows = jnp.asarray(rng.normal(size=rows.shape), dtype)
  assert_close(vjp(d_rows)[0], ref_vjp(d_rows)[0], dtype)

  inverse = jnp.argsort(order)
  out, vjp = jax.vjp(lambda y, g: ops.combine(y, order, g, True), rows, gates)
  ref, ref_vjp = jax.vjp(lambda y, g: reference.combine_rows(y, inverse, g), rows, gates)
  assert_close(out, ref, dtype)
  d_out = jnp.asarray(rng.normal(size=out.shape), dtype)
  for a, b in zip(vjp(d_out), ref_vjp(d_out)):
    assert_close(a, b, dtype)


def test_combine_after_permute_is_gate_sum():
  x = jax.random.normal(jax.random.key(0), (6, 16))
  order = jnp.asarray(np.random.default_rng(0).permutation(12), jnp.int32)
  gates = jnp.full((6, 2), 0.25)
  out = ops.combine(ops.permute(x, order, 2, True), order, gates, True)
  np.testing.assert_allclose(out, 0.5 * x, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Against JAX's own megablox kernels (interpret mode), on the same fuzzed group sizes.

MB = dict(m=256, k=128, n=128, tiling=(128, 128, 128))  # megablox needs 128-aligned tiles


def megablox():
  import importlib
  return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(0, 96), min_size=G, max_size=G), seed=st.integers(0, 3))
def test_gmm_and_tgmm_equal_megablox(sizes, seed):
  m, k, n = MB["m"], MB["k"], MB["n"]
  sizes = np.array(sizes)
  sizes[-1] += max(0, m - sizes.sum())          # cover every row (megablox's contract)
  while sizes.sum() > m:                          # ... and no more
    sizes[np.argmax(sizes)] -= sizes.sum() - m
  gs = jnp.asarray(sizes, jnp.int32)
  ks = jax.random.split(jax.random.key(seed), 3)
  lhs, rhs = jax.random.normal(ks[0], (m, k)), jax.random.normal(ks[1], (G, k, n))
  dy = jax.random.normal(ks[2], (m, n))
  mb = megablox()
  from pallas_kernels import gmm as kernels
  assert_close(kernels.gmm(lhs, rhs, gs, interpret=True),
               mb.gmm(lhs, rhs, gs, tiling=MB["tiling"], interpret=True), jnp.float32)
  assert_close(kernels.tgmm(lhs, dy, gs, G, interpret=True),
               mb.tgmm(lhs.T, dy, gs, tiling=MB["tiling"], interpret=True), jnp.float32)
  # The VJP's transposed-weights product against megablox's own transpose_rhs.
  assert_close(kernels.gmm(dy, rhs, gs, interpret=True, transpose_rhs=True),
               mb.gmm(dy, rhs, gs, tiling=MB["tiling"], transpose_rhs=True, interpret=True), jnp.float32)


def test_unsupported_dtypes_are_refused_by_name():
  from pallas_kernels import gmm as kernels
  lhs, rhs = jnp.ones((16, 8), jnp.int32), jnp.ones((2, 8, 8), jnp.int32)
  with pytest.raises(TypeError, match="int32"):
    kernels.gmm(lhs, rhs, jnp.array([8, 8]), interpret=True)
  with pytest.raises(TypeError, match="share one dtype"):
    kernels.gmm(lhs.astype(jnp.float32), rhs.astype(jnp.bfloat16), jnp.array([8, 8]), interpret=True)


def test_tile_rule():
  from pallas_kernels.gmm import tiling_for
  assert tiling_for(49152, 2048, 1408, jnp.bfloat16) == Tiling(128, 512, 128)  # 16B's w_gate
  assert tiling_for(49152, 1408, 2048, jnp.bfloat16) == Tiling(128, 128, 512)  # ... w_down
  assert tiling_for(40, 64, 768, jnp.bfloat16) == Tiling(48, 64, 256)   # 16-row bf16 sublanes
  assert tiling_for(40, 64, 768, jnp.float32).tm == 40
