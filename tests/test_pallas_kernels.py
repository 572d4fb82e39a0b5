"""Pallas kernels (interpret mode) against plain-JAX references and JAX's own megablox,
forward and VJP, with group sizes fuzzed by hypothesis: empty groups, one group holding
everything, rows past the last group, m, k and n not multiples of their tiles (interpret
mode reads NaN past an array's end, so the masks of ragged blocks are checked too), f32
and bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pallas_kernels import gmm as kernels
from pallas_kernels import ops, reference, tiling
from pallas_kernels.gmm import Tiling, make_visits, max_visits

M, K, N, G = 44, 24, 20, 5          # m not a multiple of tm=16; k, n not multiples of 16
TILING = Tiling(tm=16, tk=16, tn=16)
# Relative to the largest reference magnitude: bf16 keeps 8 bits of mantissa, f16 11.
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}
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


@pytest.mark.parametrize("tiles", [TILING, None], ids=["tiles16", "rule"])  # rule: one tile
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@FUZZ
@given(sizes=group_sizes(), seed=st.integers(0, 3))
def test_gmm_forward_and_vjp_match_reference(dtype, tiles, sizes, seed):
  lhs, rhs, dy = operands(seed, dtype)
  gs = jnp.asarray(sizes, jnp.int32)
  out, vjp = jax.vjp(lambda a, b: ops.gmm(a, b, gs, tiles, True), lhs, rhs)
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
  out = kernels.tgmm(lhs, dy, gs, G, tiling=TILING, interpret=True)
  assert_close(out, reference.tgmm(lhs, dy, gs, G), jnp.float32)


@pytest.mark.parametrize("visit_empty", [False, True], ids=["gmm", "tgmm"])
@FUZZ
@given(sizes=group_sizes())
def test_visits(visit_empty, sizes):
  """Real visits are every (group, tile) overlap in order, within the static bound. Skipped
  visits keep the last real visit's group (tgmm: and tile), so their blocks are the ones
  already in VMEM; gmm's walk on over the tiles no group reached, which they zero."""
  tm = 16
  v = make_visits(jnp.asarray(sizes), M, tm, visit_empty)
  gid, tid, nv = np.asarray(v.group_ids), np.asarray(v.tile_ids), int(v.num_visits[0])
  assert gid.shape == (max_visits(M, G, tm),) and nv <= gid.size
  ends = np.cumsum(sizes)
  want = [(g, t) for g in range(G) for t in range(M // tm + 1)
          if (sizes[g] and t * tm < ends[g] and (t + 1) * tm > ends[g] - sizes[g])
          or (visit_empty and not sizes[g] and t == min((ends[g] - sizes[g]) // tm, M // tm))]
  assert list(zip(gid[:nv], tid[:nv])) == want
  last = (gid[nv - 1], tid[nv - 1]) if nv else (gid[0], -1)
  assert np.all(gid[nv:] == last[0])
  if visit_empty:
    assert np.all(tid[nv:] == last[1])
  else:
    n_tiles = -(-M // tm)
    assert set(tid[:nv]) | set(tid[nv:]) == set(range(n_tiles)), "every tile is written"
    assert np.all(np.diff(tid) >= 0), "a tile's visits are consecutive"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@FUZZ
@given(k=st.sampled_from([1, 3]), n_tokens=st.sampled_from([5, 13]), d=st.sampled_from([16, 7]),
       seed=st.integers(0, 99))
def test_permute_and_combine_match_reference(dtype, k, n_tokens, d, seed):
  """d 7: odd 16-bit rows, padded by a column to whole 32-bit words; f16 combines in f32."""
  rng = np.random.default_rng(seed)
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

MB_TILING = (16, 16, 16)
M_MB = 48  # megablox needs m to be a multiple of its row tile: lhs gets 4 rows of no group


def megablox(name):
  import importlib
  return importlib.import_module(f"jax.experimental.pallas.ops.tpu.megablox.{name}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@FUZZ
@given(sizes=group_sizes(), seed=st.integers(0, 3))
def test_gmm_and_tgmm_equal_megablox(dtype, sizes, seed):
  """gmm forward and VJP (megablox's custom_vjp: its gmm with transpose_rhs and its tgmm),
  and tgmm alone. Megablox leaves rows past the last group undefined: compared inside."""
  lhs, rhs, dy = operands(seed, dtype)
  gs = jnp.asarray(sizes, jnp.int32)
  inside = int(sizes.sum())
  pad = lambda a: jnp.pad(a, ((0, M_MB - M), (0, 0)))
  out, vjp = jax.vjp(lambda a, b: ops.gmm(a, b, gs, TILING, True), lhs, rhs)
  mb_gmm = lambda a, b: megablox("ops").gmm(a, b, gs, dtype, MB_TILING, None, None, False, True)
  mb_out, mb_vjp = jax.vjp(mb_gmm, pad(lhs), rhs)
  assert_close(out[:inside], mb_out[:inside], dtype)
  (d_lhs, d_rhs), (mb_lhs, mb_rhs) = vjp(dy), mb_vjp(pad(dy))
  assert_close(d_lhs[:inside], mb_lhs[:inside], dtype)
  assert_close(d_rhs, mb_rhs, dtype)
  t = kernels.tgmm(lhs, dy, gs, G, tiling=TILING, interpret=True)
  mb_t = megablox("gmm").tgmm(pad(lhs).T, pad(dy), gs, dtype, MB_TILING, interpret=True)
  assert_close(t, mb_t, dtype)


def test_unsupported_dtypes_are_refused_by_name():
  lhs, rhs = jnp.ones((16, 8), jnp.int32), jnp.ones((2, 8, 8), jnp.int32)
  with pytest.raises(TypeError, match="int32"):
    kernels.gmm(lhs, rhs, jnp.array([8, 8]), interpret=True)
  with pytest.raises(TypeError, match="share one dtype"):
    kernels.gmm(lhs.astype(jnp.float32), rhs.astype(jnp.bfloat16), jnp.array([8, 8]), interpret=True)
  with pytest.raises(TypeError, match="float16"):
    kernels.tgmm(lhs.astype(jnp.float16), lhs.astype(jnp.float16), jnp.array([8, 8]), 2, interpret=True)


def test_tile_rule():
  """DeepSeekMoE-16B's expert matmuls (T 4096 x K' 6 rows, 64 experts): all of k in one block
  where VMEM allows, so a group's weights are fetched once per column tile; every choice
  within the VMEM budget and legal for Mosaic; small axes are single whole-axis blocks."""
  m, d, f, e = 4096 * 6, 2048, 1408, 64
  bf16 = jnp.bfloat16
  assert tiling.gmm_tiling(m, d, f, e, bf16) == Tiling(128, 2048, 768)   # w_gate, w_up
  assert tiling.gmm_tiling(m, f, d, e, bf16) == Tiling(128, 1408, 1024)  # w_down; d lhs of w_gate
  assert tiling.tgmm_tiling(m, d, f, e, bf16) == Tiling(256, 1024, 768)  # d w_gate
  # Output columns in an even number of blocks (two TensorCores on v4/v5p), little waste.
  assert [tiling.lane_tile(n, 2048, halves=True) for n in (1408, 2048, 256, 300, 96)] == [
      768, 1024, 128, 300, 96]
  assert tiling.gmm_tiling(44, 24, 20, 5, bf16) == Tiling(44, 24, 20)
  assert tiling.gmm_tiling(1 << 16, 2048, 1408, 2, bf16).tm == 256  # few, large groups (512: VMEM)
  for rule, vmem in ((tiling.gmm_tiling, tiling.gmm_vmem), (tiling.tgmm_tiling, tiling.tgmm_vmem)):
    for shape in ((m, d, f), (m, f, d), (8192, 16384, 16384), (300, 200, 130)):
      for dtype in (jnp.float32, bf16):
        t = rule(*shape, e, dtype)
        assert t.tk % 128 == 0 or t.tk == shape[1], (rule, shape, t)
        assert t.tn % 128 == 0 or t.tn == shape[2], (rule, shape, t)
        fixed = shape[1] if rule is tiling.gmm_tiling else shape[0]  # gmm: k; tgmm: m
        assert vmem(t, jnp.dtype(dtype).itemsize, fixed) <= tiling.VMEM_BUDGET, (rule, shape, dtype, t)
