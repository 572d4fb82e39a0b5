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
