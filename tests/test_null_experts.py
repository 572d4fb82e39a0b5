""""No expert" pairs (zero-compute experts): an expert index equal to the number of routed
experts N' routes a (token, choice) pair nowhere. Every dropless backend and both expert-
parallel exchanges leave it out: output and gradients equal the loop reference (which
skips it), no grouped matmul reads its row, and the exchanges send no row for it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moe.dispatch import capacity, cpu_kernel, few_tokens, registry, sorting
from moe.parallel import rounds
from moe.parallel.expert_parallel import block_rows, expert_parallel_moe
from moe.parallel.mesh import MeshConfig, make_mesh
from tests.capabilities import skip_or_fail
from tests.reference import capacity_keep, loop_moe
from tests.test_dispatch import E, K, T, make_weights, value_and_grads

# tokamax is GPU-only and `pallas` TPU-only (it shares its kernels with pallas_interpret).
BACKENDS = [b for b in registry.BACKEND_NAMES if b not in ("pallas", "tokamax")]


def null_routing(share=0.3, seed=0, t=T, e=E, k=K):
  """[T, K'] distinct experts per token with about `share` of the pairs set to e ("no
  expert"), token 0's every choice among them, expert e - 1 chosen by nobody; gates [T, K']
  in [0.1, 1), the null pairs' too: they must count for nothing whatever their gate."""
  rng = np.random.default_rng(seed)
  idx = np.stack([rng.permutation(e - 1)[:k] for _ in range(t)])
  idx[rng.uniform(size=idx.shape) < share] = e
  idx[0] = e
  gates = rng.uniform(0.1, 1.0, idx.shape)
  return jnp.asarray(idx, jnp.int32), jnp.asarray(gates, jnp.float32)


def backend_or_skip(name):
  if name == "cpu_ffi" and not cpu_kernel.available():
    skip_or_fail("cpu_kernel", f"cpu_ffi unavailable: {cpu_kernel.status()}")
  return registry.get(name)


def assert_equal_to_reference(fn, x, w, idx, gates):
  """fn(x, w, gates) and its gradients against the loop reference; the null pairs' gates
  get exactly zero gradient."""
  y, grads = value_and_grads(fn, x, w, gates)
  y_ref, grads_ref = value_and_grads(lambda x, w, g: loop_moe(x, idx, g, *w), x, w, gates)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
  assert not np.any(np.asarray(grads[2])[np.asarray(idx) == E]), "a null pair's gate gets 0 gradient"
  assert not np.any(np.asarray(y[0])), "a token with no expert gets exactly 0"
  for dw in grads[1]:
    assert not np.any(np.asarray(dw)[E - 1]), "an expert without rows gets exactly 0 gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_skip_null_pairs(backend):
  b = backend_or_skip(backend)
  x, w = make_weights(3)
  idx, gates = null_routing()
  assert 0.2 < float(jnp.mean(idx == E)) < 0.45
  assert_equal_to_reference(lambda x, w, g: b.routed(x, idx, g, w), x, w, idx, gates)


@pytest.mark.parametrize("path", ["gathered", "all_experts", "sorted"])
def test_few_token_paths_skip_null_pairs(path):
  """Both few-token computations, and the sorted routing's inverse (expert_of_pairs)."""
  x, w = make_weights(4)
  idx, gates = null_routing(seed=1)
  fn = {"gathered": lambda x, w, g: few_tokens.gathered_swiglu(x, idx, g, *w),
        "all_experts": lambda x, w, g: few_tokens.all_experts_swiglu(x, idx, g, *w),
        "sorted": lambda x, w, g: registry.get("few_tokens").experts(
            x, sorting.sort_by_expert(idx, E), g, w)}[path]
  assert_equal_to_reference(fn, x, w, idx, gates)
  np.testing.assert_array_equal(
      few_tokens.expert_of_pairs(sorting.sort_by_expert(idx, E), idx.shape), idx)


def test_sort_counts_null_pairs_in_no_group():
  idx, _ = null_routing()
  r = sorting.sort_by_expert(idx, E)
  flat = np.asarray(idx).ravel()
  assert r.group_sizes.shape == (E,)
  np.testing.assert_array_equal(r.group_sizes, np.bincount(flat, minlength=E + 1)[:E])
  n_real = int(np.sum(flat < E))
  assert int(sorting.n_routed(r)) == n_real
  assert np.all(flat[np.asarray(r.order)[n_real:]] == E), "null pairs sort after every group"


def _poisoning(gmm, calls):
  """A grouped matmul that records (groups, rows given, rows in groups) and sets the rows
  past the groups to NaN first: a result that stays finite never read them."""
  def spy(lhs, rhs, gs):
    n = jnp.sum(gs)
    calls.append((gs.shape[0], lhs.shape[0], int(n)))
    lhs = jnp.where((jnp.arange(lhs.shape[0]) < n)[:, None], lhs, jnp.nan)
    return gmm(lhs, rhs, gs)
  return spy


@pytest.mark.parametrize("backend", ["tiled", "pallas_interpret", "ragged_dot"])
def test_grouped_matmuls_multiply_only_the_real_pairs(backend):
  """Every grouped matmul (gate, up, down; run eagerly, so group sizes are concrete) gets
  the N' real groups, covering exactly the real pairs; rows past them (the null pairs)
  are NaN-poisoned and must not reach the output or any gradient. (tiled and Pallas
  multiply none of them beyond the last tile's padding; XLA:CPU's ragged_dot multiplies
  every row by every expert, then selects.)"""
  b = registry.get(backend)
  calls = []
  spy = dataclasses.replace(b, gmm=_poisoning(b.gmm, calls))
  x, w = make_weights(5)
  idx, gates = null_routing(seed=2)
  n_real = int(jnp.sum(idx < E))
  assert_equal_to_reference(lambda x, w, g: spy.routed(x, idx, g, w), x, w, idx, gates)
  assert calls and all(c == (E, T * K, n_real) for c in calls), calls


@pytest.mark.parametrize("backend", ["fused", "cpu_ffi"])
def test_loop_backends_see_only_the_real_groups(backend):
  """The fused loop and the C++ kernel take rows by group sizes: those cover the real
  pairs only (the rest sit past every group)."""
  b = backend_or_skip(backend)
  seen = []

  class Spy(type(b)):
    def experts(self, x, routing, gates, weights):
      seen.append((routing.group_sizes.shape[0], int(sorting.n_routed(routing))))
      return super().experts(x, routing, gates, weights)

  x, w = make_weights(6)
  idx, gates = null_routing(seed=3)
  y = Spy(gmm=b.gmm, permute=b.permute, combine=b.combine).routed(x, idx, gates, w)
  np.testing.assert_allclose(y, loop_moe(x, idx, gates, *w), rtol=1e-5, atol=1e-5)
  assert seen == [(E, int(jnp.sum(idx < E)))]


def test_pallas_row_kernels_copy_only_the_real_rows():
  """gather_rows leaves the rows from n_rows on unwritten (NaN in interpret mode) and
  combine_rows reads no row at or past n_src: a NaN row there changes nothing."""
  from pallas_kernels import permute as kernels

  x = jax.random.normal(jax.random.key(0), (6, 16))
  src = jnp.asarray([3, 0, 5, 1, 2, 4, 0, 1], jnp.int32)
  rows = kernels.gather_rows(x, src, jnp.int32(5), interpret=True)
  np.testing.assert_array_equal(rows[:5], x[src[:5]])
  assert np.all(np.isnan(np.asarray(rows[5:]))), "rows past n_rows are not copied"
  y = rows.at[5:].set(jnp.nan)
  out = kernels.combine_rows(y, src, jnp.full((4, 2), 0.5), jnp.int32(5), interpret=True)
  ref = 0.5 * jnp.where((src < 5)[:, None], y[jnp.minimum(src, 4)], 0).reshape(4, 2, -1).sum(1)
  np.testing.assert_allclose(out, ref, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Expert parallelism on 8 simulated devices: experts 2s, 2s+1 on shard s of expert:4.

TE, DE, EE, FE, KE = 64, 16, 8, 8, 2


def ep_inputs(share, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (TE, DE))
  w = (jax.random.normal(ks[1], (EE, DE, FE)) * 0.3, jax.random.normal(ks[2], (EE, DE, FE)) * 0.3,
       jax.random.normal(ks[3], (EE, FE, DE)) * 0.3)
  idx, gates = null_routing(share, seed, t=TE, e=EE, k=KE)
  return x, gates, idx, w


def ep_value_and_grads(fn, x, gates, w):
  cot = jax.random.normal(jax.random.key(99), (TE, DE))
  loss = lambda x, g, w: jnp.sum(fn(x, g, w) * cot)
  return fn(x, gates, w), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, gates, w)


def assert_ep_equal_to_reference(run, x, gates, idx, w, keep=None):
  y, grads = ep_value_and_grads(lambda x, g, w: run(x, g, w).y, x, gates, w)
  y_ref, grads_ref = ep_value_and_grads(lambda x, g, w: loop_moe(x, idx, g, *w, keep=keep), x, gates, w)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
  assert not np.any(np.asarray(grads[1])[np.asarray(idx) == EE])


@pytest.mark.parametrize("layout", ["data:2,expert:4", "fsdp:2,expert:2,tensor:2"])
def test_dropless_rounds_skip_null_pairs(layout):
  x, gates, idx, w = ep_inputs(0.3)
  mesh = make_mesh(MeshConfig(layout))
  run = lambda x, g, w: expert_parallel_moe(x, g, idx, w, registry.get("tiled"), mesh)
  assert_ep_equal_to_reference(run, x, gates, idx, w)
  out = jax.jit(run)(x, gates, w)
  assert int(out.n_dropped) == 0, "null pairs are never unserved"


@pytest.mark.parametrize("backend, factor", [("tiled", 4.0), ("pallas_interpret", 4.0), ("tiled", 0.5)])
def test_capacity_exchange_skips_null_pairs(backend, factor):
  """Null pairs take no slot and are not dropped: with room for every pair nothing is
  dropped; with less, exactly the real pairs that miss their block are (GShard order
  among the real pairs alone)."""
  x, gates, idx, w = ep_inputs(0.3, seed=1)
  mesh = make_mesh(MeshConfig("data:2,expert:4"))
  run = lambda x, g, w: expert_parallel_moe(x, g, idx, w, registry.get(backend), mesh, factor)
  t_loc = TE // 8
  cap = block_rows(t_loc, KE, 4, factor)
  real = np.asarray(idx) < EE
  keep = np.concatenate([capacity_keep(np.asarray(idx[i:i + t_loc]) // 2, 4, cap, real[i:i + t_loc])
                         for i in range(0, TE, t_loc)])
  assert_ep_equal_to_reference(run, x, gates, idx, w, keep=jnp.asarray(keep))
  dropped = int(jax.jit(run)(x, gates, w).n_dropped)
  assert dropped == int(real.sum() - keep.sum())
  assert (dropped == 0) == (factor == 4.0)


def test_assign_slots_gives_null_pairs_no_slot():
  # Expert 1 has one slot; token 0's choices are both null, token 1's first is.
  idx = jnp.array([[2, 2], [2, 1], [1, 0]])
  slots = capacity.assign_slots(idx, 2, cap=1)
  np.testing.assert_array_equal(slots.slot_token, [2, 2])   # expert 0: token 2, expert 1: token 2
  np.testing.assert_array_equal(slots.pair_slot, [[2, 2], [2, 2], [1, 0]])  # 2: no slot
  assert int(slots.n_dropped) == 1  # token 1's expert 1 found it full; null pairs are not counted
  masked = capacity.assign_slots(idx, 2, cap=1, token_mask=jnp.array([True, False, True]))
  assert int(masked.n_dropped) == 0


def _sends(idx, blocks, n_shards=4, e_local=2):
  """Per device under data:2,expert:4: [rows placed in send buffers over all rounds, pair
  slots filled, null pairs ever active, unserved pairs, rows_per_pair]."""
  def count(idx):
    sched, stats = rounds.schedule(idx, e_local, n_shards, blocks)
    t = idx.shape[0]

    def body(j, acc):
      s = rounds.round_sends(sched, j, t, n_shards, blocks)
      return acc + jnp.stack([jnp.sum(s.row_token < t), jnp.sum(s.pair_at < n_shards * blocks.pairs),
                              jnp.sum(s.active & ~sched.real), jnp.int32(0)])
    acc = jax.lax.fori_loop(0, sched.n_rounds, body, jnp.zeros(4, jnp.int32))
    return jnp.concatenate([acc.at[3].set(stats.unserved).astype(jnp.float32),
                            stats.rows_per_pair[None]])[None]

  mesh = make_mesh(MeshConfig("data:2,expert:4"))
  spec = P(("data", "expert"))
  return np.asarray(jax.jit(jax.shard_map(count, mesh=mesh, in_specs=spec, out_specs=spec,
                                          check_vma=False))(idx))


def test_rounds_send_one_row_per_token_and_shard_of_the_real_choices():
  """Rows actually placed in the send buffers (round by round) = distinct (token, shard) of
  the real choices; pair slots = real pairs; rows_per_pair falls as the null share rises."""
  t_loc = TE // 8
  # One pair round (blocks of every pair a device can send one shard), so no token's pairs
  # to one shard are split over rounds; row blocks stay the default size.
  blocks = rounds.block_sizes(t_loc, KE, EE, 4, factor=4.0)
  assert blocks.q_max == 1
  per_share = []
  for share in (0.0, 0.3, 0.6):
    idx = null_routing(share, seed=2, t=TE, e=EE, k=KE)[0]
    got = _sends(idx, blocks)
    flat = np.asarray(idx)
    distinct = sum(len({e // 2 for e in row if e < EE}) for row in flat)
    assert got[:, 0].sum() == distinct
    assert got[:, 1].sum() == np.sum(flat < EE)
    assert got[:, 2].sum() == 0 and got[:, 3].sum() == 0, "null pairs never sent nor unserved"
    assert float(np.mean(got[:, 4])) == pytest.approx(distinct / flat.size)
    per_share.append(float(np.mean(got[:, 4])))
  assert per_share[0] > per_share[1] > per_share[2], per_share


def test_layer_statistics_fall_with_the_null_share():
  """expert_parallel_moe's rows_per_pair (default blocks) falls as the null share rises;
  nothing is unserved."""
  mesh = make_mesh(MeshConfig("data:2,expert:4"))
  got = []
  for share in (0.0, 0.3, 0.6):
    x, gates, idx, w = ep_inputs(share, seed=3)
    out = jax.jit(lambda x, g, w: expert_parallel_moe(x, g, idx, w, registry.get("tiled"), mesh))(x, gates, w)
    np.testing.assert_allclose(out.y, loop_moe(x, idx, gates, *w), rtol=1e-5, atol=1e-5)
    assert int(out.n_dropped) == 0
    got.append(float(out.rows_per_pair))
  assert got[0] > got[1] > got[2], got
