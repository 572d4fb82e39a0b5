import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.model import balance
from moe.model.routers import hash_experts, top_k

# 4 tokens, 4 experts, top-2. Counts: e0: 3, e1: 2, e2: 2, e3: 1.
SCORES = jnp.array([[0.4, 0.3, 0.2, 0.1],
                    [0.1, 0.5, 0.3, 0.1],
                    [0.6, 0.1, 0.1, 0.2],
                    [0.3, 0.2, 0.4, 0.1]])
IDX = jnp.array([[0, 1], [1, 2], [0, 3], [2, 0]])


def test_expert_balance_loss_by_hand():
  # f_i = N'/(K'T) count_i = 4/8 * [3, 2, 2, 1]; P_i = column means.
  f = np.array([1.5, 1.0, 1.0, 0.5])
  p = np.array([1.4, 1.1, 1.0, 0.5]) / 4
  np.testing.assert_allclose(balance.expert_balance_loss(SCORES, IDX), np.sum(f * p), rtol=1e-6)
  np.testing.assert_allclose(np.sum(f * p), 1.5 * .35 + .275 + .25 + .5 * .125)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_perfect_balance_gives_one(k):
  t, n = 8, 4  # every expert chosen 2k times, uniform scores
  scores = jnp.full((t, n), 1.0 / n)
  idx = jnp.array([[(i + j) % n for j in range(k)] for i in range(t)])
  np.testing.assert_allclose(balance.expert_balance_loss(scores, idx), 1.0, rtol=1e-6)
  # All choices on one expert: f_0 = N' and the loss is N' * P_0 = 1 for uniform scores,
  # but N' when the scores follow the choice.
  skewed = jnp.zeros((t, k), jnp.int32) + jnp.arange(k)
  onehot = jnp.zeros((t, n)).at[:, :k].set(1.0 / k)
  np.testing.assert_allclose(balance.expert_balance_loss(onehot, skewed), n / k, rtol=1e-6)


def test_device_balance_loss_by_hand():
  # Groups {0, 1}, {2, 3}: f' = [1.25, 0.75], P' = [2.5/4, 1.5/4].
  expected = 1.25 * 2.5 / 4 + 0.75 * 1.5 / 4
  np.testing.assert_allclose(balance.device_balance_loss(SCORES, IDX, 2), expected, rtol=1e-6)
  # Groups of consecutive experts, not strided: {0, 1, 2} and {3, 4, 5} of six experts.
  scores = jnp.array([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1, 0.1, 0.5]])
  idx = jnp.array([[0], [0]])  # f = [6, 0, 0, 0, 0, 0] -> f' = [2, 0]; P' = [0.5, 0.5]
  np.testing.assert_allclose(balance.device_balance_loss(scores, idx, 2), 2 * 0.5, rtol=1e-6)


def test_device_loss_reduces_to_expert_loss():
  key = jax.random.key(0)
  scores = jax.nn.softmax(jax.random.normal(key, (32, 8)), axis=-1)
  _, idx = top_k(scores, 3)
  np.testing.assert_allclose(balance.device_balance_loss(scores, idx, 8),
                             balance.expert_balance_loss(scores, idx), rtol=1e-6)
  # One group: f' is the mean f (= 1), P' sums to 1.
  np.testing.assert_allclose(balance.device_balance_loss(scores, idx, 1), 1.0, rtol=1e-6)


def test_balance_gradient_flows_through_p_only():
  logits = jax.random.normal(jax.random.key(1), (16, 4))

  def loss(logits):
    scores = jax.nn.softmax(logits, axis=-1)
    return balance.expert_balance_loss(scores, top_k(scores, 2)[1])

  g = jax.grad(loss)(logits)
  # f by hand from the choices, held constant: N'/(K'T) * count_i.
  idx = np.argsort(-np.asarray(jax.nn.softmax(logits, axis=-1)), axis=-1)[:, :2]
  f = np.bincount(idx.ravel(), minlength=4) * 4 / (2 * 16)
  g_ref = jax.grad(lambda l: jnp.sum(f * jnp.mean(jax.nn.softmax(l, axis=-1), axis=0)))(logits)
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)


def test_top_k_raw_and_normalized():
  gates, idx = top_k(SCORES, 2)
  np.testing.assert_array_equal(idx, [[0, 1], [1, 2], [0, 3], [2, 0]])
  np.testing.assert_allclose(gates, [[.4, .3], [.5, .3], [.6, .2], [.4, .3]], rtol=1e-6)
  gates, _ = top_k(SCORES, 2, normalize=True)
  np.testing.assert_allclose(jnp.sum(gates, -1), 1.0, rtol=1e-6)


def test_z_loss_by_hand():
  logits = jnp.array([[0.0, 0.0], [1.0, 1.0]])
  expected = (np.log(2) ** 2 + (1 + np.log(2)) ** 2) / 2
  np.testing.assert_allclose(balance.z_loss(logits), expected, rtol=1e-6)


def test_hash_is_fixed_and_spreads_tokens():
  ids = jnp.arange(4096)
  a, b = hash_experts(ids, 16), hash_experts(ids, 16)
  np.testing.assert_array_equal(a, b)
  counts = np.bincount(np.asarray(a[:, 0]), minlength=16)
  assert counts.min() > 4096 / 16 * 0.7, counts


def test_routing_stats():
  stats = balance.routing_stats(IDX, 4, jnp.array(2), SCORES)
  np.testing.assert_allclose(stats["load"], [3 / 8, 2 / 8, 2 / 8, 1 / 8])
  np.testing.assert_allclose(stats["max_over_mean_load"], 1.5)
  np.testing.assert_allclose(stats["dropped_fraction"], 2 / 8)
  ent = -np.mean(np.sum(np.asarray(SCORES) * np.log(np.asarray(SCORES)), -1))
  np.testing.assert_allclose(stats["router_entropy"], ent, rtol=1e-6)
  assert float(balance.routing_stats(IDX, 4, 0)["router_entropy"]) == 0.0


def test_gshard_keeps_the_second_expert_with_probability_min_1_2g2():
  """Over many tokens, the second choice's keep rate in each band of g_2 matches the mean
  of min(1, 2 g_2) there, within 4 binomial standard deviations."""
  from moe.model.routers import RouteArgs, route_gshard
  t, n = 40_000, 8
  logits = 1.5 * jax.random.normal(jax.random.key(0), (t, n))
  args = RouteArgs(cfg=None, logits=logits, token_ids=None, key=jax.random.key(1))
  route = route_gshard(args)
  g2 = np.asarray(route.gates[:, 1])
  kept = np.asarray(route.keep[:, 1])
  assert np.all(np.asarray(route.keep[:, 0]))
  expected = np.minimum(1.0, 2.0 * g2)
  bands = np.quantile(g2, np.linspace(0, 1, 6))
  for lo, hi in zip(bands[:-1], bands[1:]):
    sel = (g2 >= lo) & (g2 < hi) if hi < bands[-1] else (g2 >= lo)
    p = expected[sel].mean()
    sd = np.sqrt(p * (1 - p) / sel.sum()) + 1e-9
    assert abs(kept[sel].mean() - p) < 4 * sd + 1e-3, (lo, hi, kept[sel].mean(), p)
  # Without a key (evaluation) both choices are always kept.
  assert np.all(np.asarray(route_gshard(args._replace(key=None)).keep))


def test_sequence_wise_balance_loss_by_hand():
  """DeepSeek-V3's complementary loss: sum_i f_i P_i per sequence over scores normalised to
  sum 1, averaged over sequences. Two sequences of two tokens, four experts, top-2."""
  raw = jnp.array([[2., 1., 1., 0.], [0., 1., 2., 1.],    # sequence A -> s' rows /4
                   [1., 1., 1., 1.], [3., 1., 0., 0.]])   # sequence B
  idx = jnp.array([[0, 1], [2, 3], [0, 1], [0, 1]])
  # A: f = 4/(2*2) * [1, 1, 1, 1], P = [.25, .25, .375, .125] -> 1.0
  # B: f = 4/(2*2) * [2, 2, 0, 0], P = [.5, .25, .125, .125] -> 1.5
  np.testing.assert_allclose(balance.seq_balance_loss(raw, idx, 2), (1.0 + 1.5) / 2, rtol=1e-6)
  # Over the batch as one sequence the value differs (1.125): the unit matters.
  np.testing.assert_allclose(balance.seq_balance_loss(raw, idx, 1), 1.125, rtol=1e-6)
  # B's second token masked out: B is one token of uniform scores, f = [2, 2, 0, 0] -> 1.0.
  mask = jnp.array([True, True, True, False])
  np.testing.assert_allclose(balance.seq_balance_loss(raw, idx, 2, mask), 1.0, rtol=1e-6)


@pytest.mark.parametrize("fields, message", [
    (dict(router="group_limited", n_group=3), "n_group=3: does not divide"),
    (dict(router="group_limited", n_group=4, topk_group=5), "topk_group=5"),
    (dict(router="sigmoid_bias", n_group=4, topk_group=1, n_activated_experts=3), "n_activated_experts=3"),
    (dict(router="topk", n_group=4), "does not limit groups"),
    (dict(router="group_limited", n_null_experts=2), "zero-compute"),
    (dict(router="hash", n_activated_experts=1, routed_scaling_factor=2.0), "fixed gates"),
])
def test_router_fields_are_checked(fields, message):
  from moe.model.config import ModelConfig

  base = dict(n_routed_experts=8, n_activated_experts=2, expert_width=16)
  with pytest.raises(ValueError, match=message):
    ModelConfig(**{**base, **fields})


def test_groups_per_shard_must_fit_the_mesh():
  """n_group 0 (one group per expert shard) on a mesh whose expert axis is smaller than
  topk_group is a config error naming both, not a silent fallback."""
  from flax import nnx

  from moe.model.config import ModelConfig
  from moe.model.moe_layer import MoE
  from moe.parallel.mesh import MeshConfig, make_mesh, use_mesh

  cfg = ModelConfig(d_model=32, n_heads=4, router="group_limited", n_routed_experts=8,
                    n_activated_experts=2, expert_width=16, n_group=0, topk_group=4)
  layer = MoE(cfg, nnx.Rngs(0))
  x = jnp.ones((16, 32))
  with use_mesh(make_mesh(MeshConfig("fsdp:4,expert:2"))):
    with pytest.raises(ValueError, match="n_group=0 .* 2 shard"):
      layer(x, jnp.zeros((16,), jnp.int32))
