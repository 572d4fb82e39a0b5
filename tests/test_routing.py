import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.model import routing

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
  np.testing.assert_allclose(routing.expert_balance_loss(SCORES, IDX), np.sum(f * p), rtol=1e-6)
  np.testing.assert_allclose(np.sum(f * p), 1.5 * .35 + .275 + .25 + .5 * .125)


def test_perfect_balance_gives_one():
  t, n, k = 8, 4, 2
  scores = jnp.full((t, n), 1.0 / n)
  idx = jnp.array([[i % n, (i + 1) % n] for i in range(t)])
  np.testing.assert_allclose(routing.expert_balance_loss(scores, idx), 1.0, rtol=1e-6)
  assert k == idx.shape[1]


def test_device_balance_loss_by_hand():
  # Groups {0, 1}, {2, 3}: f' = [1.25, 0.75], P' = [2.5/4, 1.5/4].
  expected = 1.25 * 2.5 / 4 + 0.75 * 1.5 / 4
  np.testing.assert_allclose(routing.device_balance_loss(SCORES, IDX, 2), expected, rtol=1e-6)


def test_device_loss_reduces_to_expert_loss():
  key = jax.random.key(0)
  scores = jax.nn.softmax(jax.random.normal(key, (32, 8)), axis=-1)
  _, idx = routing.top_k(scores, 3)
  np.testing.assert_allclose(routing.device_balance_loss(scores, idx, 8),
                             routing.expert_balance_loss(scores, idx), rtol=1e-6)
  # One group: f' is the mean f (= 1), P' sums to 1.
  np.testing.assert_allclose(routing.device_balance_loss(scores, idx, 1), 1.0, rtol=1e-6)


def test_balance_gradient_flows_through_p_only():
  logits = jax.random.normal(jax.random.key(1), (16, 4))

  def loss(logits):
    scores = jax.nn.softmax(logits, axis=-1)
    return routing.expert_balance_loss(scores, routing.top_k(scores, 2)[1])

  g = jax.grad(loss)(logits)
  scores = jax.nn.softmax(logits, axis=-1)
  f, _ = routing.balance_terms(scores, routing.top_k(scores, 2)[1])
  g_ref = jax.grad(lambda l: jnp.sum(f * jnp.mean(jax.nn.softmax(l, axis=-1), axis=0)))(logits)
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)


def test_top_k_raw_and_normalized():
  gates, idx = routing.top_k(SCORES, 2)
  np.testing.assert_array_equal(idx, [[0, 1], [1, 2], [0, 3], [2, 0]])
  np.testing.assert_allclose(gates, [[.4, .3], [.5, .3], [.6, .2], [.4, .3]], rtol=1e-6)
  gates, _ = routing.top_k(SCORES, 2, normalize=True)
  np.testing.assert_allclose(jnp.sum(gates, -1), 1.0, rtol=1e-6)


def test_z_loss_by_hand():
  logits = jnp.array([[0.0, 0.0], [1.0, 1.0]])
  expected = (np.log(2) ** 2 + (1 + np.log(2)) ** 2) / 2
  np.testing.assert_allclose(routing.z_loss(logits), expected, rtol=1e-6)


def test_hash_is_fixed_and_spreads_tokens():
  ids = jnp.arange(4096)
  a, b = routing.hash_experts(ids, 16), routing.hash_experts(ids, 16)
  np.testing.assert_array_equal(a, b)
  counts = np.bincount(np.asarray(a[:, 0]), minlength=16)
  assert counts.min() > 4096 / 16 * 0.7, counts


def test_routing_stats():
  stats = routing.routing_stats(IDX, 4, jnp.array(2), SCORES)
  np.testing.assert_allclose(stats["load"], [3 / 8, 2 / 8, 2 / 8, 1 / 8])
  np.testing.assert_allclose(stats["max_over_mean_load"], 1.5)
  np.testing.assert_allclose(stats["dropped_fraction"], 2 / 8)
  ent = -np.mean(np.sum(np.asarray(SCORES) * np.log(np.asarray(SCORES)), -1))
  np.testing.assert_allclose(stats["router_entropy"], ent, rtol=1e-6)
  assert float(routing.routing_stats(IDX, 4, 0)["router_entropy"]) == 0.0


@pytest.mark.parametrize("n_groups", [2, 4])
def test_device_groups_are_consecutive_experts(n_groups):
  scores = jax.nn.softmax(jax.random.normal(jax.random.key(2), (16, 8)), axis=-1)
  _, idx = routing.top_k(scores, 2)
  f, p = routing.balance_terms(scores, idx)
  f_np, p_np = np.asarray(f).reshape(n_groups, -1), np.asarray(p).reshape(n_groups, -1)
  expected = np.sum(f_np.mean(1) * p_np.sum(1))
  np.testing.assert_allclose(routing.device_balance_loss(scores, idx, n_groups), expected, rtol=1e-6)
