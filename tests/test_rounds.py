"""Dropless expert parallelism in rounds (moe.parallel.rounds) on 8 simulated devices: equal
to the single-device loop reference, forward and every gradient, for balanced and
adversarial routings; rounds grow with skew; the compiled all_to_all bytes per round match
the plan's formula."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moe.dispatch import registry
from moe.parallel import rounds
from moe.parallel.expert_parallel import expert_parallel_moe
from moe.parallel.mesh import MeshConfig, make_mesh
from tests.capabilities import tpu_devices_or_skip
from tests.reference import all_to_all_bytes_sent, loop_moe

T, D, E, F, K = 64, 16, 8, 8, 2


def routing(case, seed=0):
  """expert_idx [T, K] (distinct experts per token) for each named case; shards hold
  experts 2s, 2s+1 on expert:4, 4s..4s+3 on expert:2."""
  rng = np.random.default_rng(seed)
  if case == "random":
    idx = np.stack([rng.permutation(E)[:K] for _ in range(T)])
  elif case == "one_expert":         # every token's first choice is expert 5
    idx = np.stack([[5, rng.choice(np.delete(np.arange(E), 5))] for _ in range(T)])
  elif case == "one_shard":          # everything to experts 6, 7: one shard unless expert:8
    idx = np.tile([6, 7], (T, 1))
  elif case == "all_but_one_empty":  # experts 0 and 1 only
    idx = np.tile([1, 0], (T, 1))
  elif case == "same_shard":         # each token's choices on one shard, shards random
    idx = np.stack([[2 * (s := rng.integers(0, E // 2)), 2 * s + 1] for _ in range(T)])
  return jnp.asarray(idx, jnp.int32)


def inputs(case, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (T, D))
  gates = jax.random.uniform(ks[1], (T, K), minval=0.1, maxval=1.0)
  w = (jax.random.normal(ks[2], (E, D, F)) * 0.3, jax.random.normal(ks[3], (E, D, F)) * 0.3,
       jax.random.normal(ks[4], (E, F, D)) * 0.3)
  return x, gates, routing(case, seed), w


def value_and_grads(fn, x, gates, w):
  cot = jax.random.normal(jax.random.key(99), (T, D))
  loss = lambda x, g, w: jnp.sum(fn(x, g, w) * cot)
  return fn(x, gates, w), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, gates, w)


def ep(layout, idx, factor=rounds.BLOCK_FACTOR):
  mesh = make_mesh(MeshConfig(layout))
  return lambda x, g, w: expert_parallel_moe(x, g, idx, w, registry.get("tiled"), mesh,
                                              block_factor=factor)


# Every routing case, each layout at least twice (a full product costs 2.5x the time).
@pytest.mark.parametrize("layout, case", [
    ("expert:8", "random"), ("data:2,expert:4", "one_expert"), ("fsdp:2,expert:2,tensor:2", "one_shard"),
    ("expert:8", "all_but_one_empty"), ("data:2,expert:4", "same_shard"),
    ("fsdp:2,expert:2,tensor:2", "random")])
def test_rounds_equal_the_loop_reference(layout, case):
  x, gates, idx, w = inputs(case)
  run = ep(layout, idx)
  y, grads = value_and_grads(lambda x, g, w: run(x, g, w).y, x, gates, w)
  y_ref, grads_ref = value_and_grads(lambda x, g, w: loop_moe(x, idx, g, *w), x, gates, w)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
  out = jax.jit(run)(x, gates, w)
  assert int(out.n_dropped) == 0 and int(out.rounds) >= 1  # n_dropped: pairs left unserved


def test_skew_costs_rounds_not_tokens():
  # 256 tokens, 16 experts (2 per shard on expert:8), K' = 2: 32 tokens per device.
  t, e, k = 256, 16, 2
  rng = np.random.default_rng(0)
  ks = jax.random.split(jax.random.key(1), 5)
  x, gates = jax.random.normal(ks[0], (t, D)), jax.random.uniform(ks[1], (t, k), minval=0.1)
  w = (jax.random.normal(ks[2], (e, D, F)), jax.random.normal(ks[3], (e, D, F)),
       jax.random.normal(ks[4], (e, F, D)))
  cases = {"random": np.stack([rng.permutation(e)[:k] for _ in range(t)]),
           "one_shard": np.tile([14, 15], (t, 1))}   # both choices on the last shard
  got = {}
  for case, idx in cases.items():
    run = ep("expert:8", jnp.asarray(idx, jnp.int32))
    out = jax.jit(run)(x, gates, w)
    np.testing.assert_allclose(out.y, loop_moe(x, jnp.asarray(idx), gates, *w), rtol=1e-4, atol=1e-4)
    got[case] = (int(out.rounds), float(out.max_block_load), float(out.rows_per_pair))
  # Blocks of Bp = ceil(1.25 * 32 * 2 / 8) = 10 pairs: random routing fits one or two rounds;
  # 64 pairs of each device to one shard need ceil(64 / 10) = 7.
  assert got["random"][0] <= 2 and got["one_shard"][0] == 7
  assert got["one_shard"][1] == pytest.approx(64 / 10)
  # A token's two choices on one shard travel as one row; random choices rarely share one.
  assert got["one_shard"][2] == pytest.approx(0.5)
  assert got["random"][2] > 0.9


def test_a_schedule_short_of_rounds_counts_the_pairs_it_leaves():
  """n_dropped on the rounds path counts pairs whose round the loop never runs: 0 for the
  real schedule, the last round's pairs when the loop stops one round early."""
  idx = routing("one_shard")       # each device's 8 tokens x 2 choices all to shard 3
  blocks = rounds.block_sizes(t_local=8, k=K, n_experts=E, n_shards=4)
  mesh = make_mesh(MeshConfig("data:2,expert:4"))

  def counts(idx):
    sched, stats = rounds.schedule(idx, E // 4, 4, blocks)
    short = sched._replace(n_rounds=sched.n_rounds - 1)
    return jnp.stack([stats.unserved, rounds.unserved(short), sched.n_rounds])[None]

  out = np.asarray(jax.jit(jax.shard_map(counts, mesh=mesh, in_specs=P(("data", "expert")),
                                         out_specs=P(("data", "expert")), check_vma=False))(idx))
  # Blocks of Bp = ceil(1.25 * 8 * 2 / 4) = 5 pairs: 16 pairs take rounds of 5, 5, 5 and 1.
  assert blocks.pairs == 5
  np.testing.assert_array_equal(out, np.tile([0, 1, 4], (8, 1)))


def test_block_sizes_follow_the_balanced_share():
  b = rounds.block_sizes(t_local=4096, k=6, n_experts=64, n_shards=8)
  assert b.pairs == math.ceil(1.25 * 4096 * 6 / 8)
  # Uniform routing: a token hits 8 * (1 - C(56,6)/C(64,6)) = 4.54 of 8 shards: 0.756 rows/pair.
  assert rounds.balanced_rows_per_pair(64, 8, 6) == pytest.approx(8 * (1 - 32468436 / 74974368) / 6)
  assert b.rows == math.ceil(b.pairs * rounds.balanced_rows_per_pair(64, 8, 6))
  one = rounds.block_sizes(t_local=64, k=3, n_experts=8, n_shards=1)
  assert one.rows <= 64 and one.q_max == 1  # no expert axis: one round, each token once


def test_all_to_all_bytes_per_round_match_the_compiled_program():
  mesh = make_mesh(MeshConfig("data:2,expert:4"))
  x, gates, idx, w = inputs("random")
  fn = jax.jit(lambda x, g, w: expert_parallel_moe(x, g, idx, w, registry.get("tiled"), mesh).y)
  hlo = fn.lower(x, gates, w).compile().as_text()
  total = all_to_all_bytes_sent(hlo, 4)
  blocks = rounds.block_sizes(T // 8, K, E, 4)
  assert total == rounds.round_bytes(blocks, 4, D, 4)  # the loop body: one round


def test_ragged_exchange_compiles_for_tpu():
  """lax.ragged_all_to_all does not run on CPU: the rounds with exchange="ragged" are
  compiled, forward and backward, by the TPU compiler for a 4-chip slice instead."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  devices = tpu_devices_or_skip("v5p:2x2x1")
  mesh = make_mesh(MeshConfig("expert:4"), devices)
  x, gates, idx, w = inputs("random")
  spec = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s))
  args = (spec(x, P("expert")), spec(gates, P("expert")), spec(idx, P("expert")),
          *(spec(a, P("expert")) for a in w))

  def loss(x, g, i, *w):
    out = expert_parallel_moe(x, g, i, w, registry.get("tiled"), mesh, exchange="ragged")
    return jnp.sum(out.y ** 2)

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 3, 4, 5))).lower(*args).compile().as_text()
  # Rows there and back in the forward, the same in the recomputed forward of the backward,
  # and the two transposes.
  assert hlo.count("ragged-all-to-all(") >= 4


@pytest.mark.parametrize("remat", [False, True])
def test_a_train_steps_all_to_all_bytes_match_the_compiled_program(remat):
  """The plan's per-step formula against the compiled train step: the layers are scanned,
  so the module text holds one MoE layer's exchange (forward, and backward: the round sent
  again for its VJP without its return trip, then the transposes), with remat or without."""
  from moe.train.config import TrainConfig
  from moe.train.plan import compile_step, step_all_to_all_bytes
  from tests.test_sharding import CFG

  mesh = make_mesh(MeshConfig("data:2,expert:4"))
  cfg = CFG.replace(remat=remat, n_layers=3)
  compiled = compile_step(cfg, TrainConfig(), mesh, 8, 16)[0]
  per_layer = step_all_to_all_bytes(cfg, mesh, tokens_per_device=16) // cfg.n_moe_layers
  assert all_to_all_bytes_sent(compiled.as_text(), 4) == per_layer
