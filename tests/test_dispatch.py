"""Every dispatch path against the one-expert-at-a-time loop reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.dispatch import backend as backends, capacity, cpu_kernel, gpu, registry, sorting
from moe.model.moe_layer import capacity_moe, dropless_moe
from moe.model.routers import Route
from tests.capabilities import skip_or_fail
from tests.reference import capacity_keep, loop_moe

T, D, F, E, K = 24, 16, 8, 6, 3


def make_weights(seed=0, e=E):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (T, D))
  w = (0.3 * jax.random.normal(ks[1], (e, D, F)), 0.3 * jax.random.normal(ks[2], (e, D, F)),
       0.3 * jax.random.normal(ks[3], (e, F, D)))
  return x, w


def routings(seed):
  """Named routings [T, K'] of distinct experts per token, with gates."""
  rng = np.random.default_rng(seed)
  rand = np.stack([rng.permutation(E)[:K] for _ in range(T)])
  skewed = np.stack([rng.permutation(3)[:K] for _ in range(T)])   # experts 3.. get nothing
  one = np.zeros((T, 1), np.int64)                                 # everything to expert 0
  gates = lambda idx: jnp.asarray(rng.uniform(0.1, 1.0, idx.shape), jnp.float32)
  return {"random": (jnp.asarray(rand), gates(rand)),
          "empty_experts": (jnp.asarray(skewed), gates(skewed)),
          "all_to_one": (jnp.asarray(one), gates(one))}


BACKENDS = sorted(registry.BACKEND_NAMES)


def dropless(x, w, idx, gates, backend):
  route = Route(gates, idx, None, None)
  return dropless_moe(x, route, w, registry.get(backend))[0]


def value_and_grads(fn, x, w, gates):
  """Forward output and gradients w.r.t. x, every weight and the gates of a fixed cotangent."""
  cot = jax.random.normal(jax.random.key(99), (T, D))
  loss = lambda x, w, g: jnp.sum(fn(x, w, g) * cot)
  return fn(x, w, gates), jax.grad(loss, argnums=(0, 1, 2))(x, w, gates)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "pallas"])
@pytest.mark.parametrize("case", ["random", "empty_experts", "all_to_one"])
def test_dropless_equals_loop(backend, case):
  if backend == "cpu_ffi" and not cpu_kernel.available():
    skip_or_fail("cpu_kernel", f"cpu_ffi unavailable: {cpu_kernel.status()}")
  if backend == "tokamax" and not gpu.tokamax_status()[0]:
    pytest.skip(f"tokamax unavailable: {gpu.tokamax_status()[1]}")
  x, w = make_weights()
  idx, gates = routings(1)[case]
  y, grads = value_and_grads(lambda x, w, g: dropless(x, w, idx, g, backend), x, w, gates)
  y_ref, grads_ref = value_and_grads(lambda x, w, g: loop_moe(x, idx, g, *w), x, w, gates)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
  unused = sorted(set(range(E)) - set(np.asarray(idx).ravel().tolist()))
  for dw in grads[1]:
    assert not np.any(np.asarray(dw)[unused]), "experts without tokens must get exactly zero gradient"


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("case", ["random", "empty_experts", "all_to_one"])
def test_capacity_equals_loop_on_kept_pairs(capacity_factor, case):
  x, w = make_weights(2)
  idx, gates = routings(3)[case]
  keep = jnp.asarray(np.random.default_rng(4).uniform(size=idx.shape) < 0.8)
  cap = capacity.slots_per_expert(T, E, idx.shape[1], capacity_factor)
  fits = jnp.asarray(capacity_keep(idx, E, cap, keep))

  fn = lambda x, w, g: capacity_moe(x, Route(g, idx, None, None, keep), w, capacity_factor)[0]
  y, grads = value_and_grads(fn, x, w, gates)
  y_ref, grads_ref = value_and_grads(lambda x, w, g: loop_moe(x, idx, g, *w, keep=fits), x, w, gates)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
  n_dropped = capacity_moe(x, Route(gates, idx, None, None, keep), w, capacity_factor)[1]
  assert int(n_dropped) == int(np.sum(np.asarray(keep)) - np.sum(np.asarray(fits)))
  if capacity_factor == 4.0 and case == "random":
    assert int(n_dropped) == 0


def test_ragged_or_fused_picks_by_ragged_dot_expansion():
  ragged_or_fused = registry.get("ragged_or_fused")
  x, w = make_weights()
  idx, gates = routings(1)["random"]
  expansion = backends.ragged_dot_bytes(T * K, w[0])
  assert expansion == E * T * K * D * 4
  assert ragged_or_fused.pick(T * K, w[0]) is registry.get("ragged_dot")
  assert registry.concrete_name("ragged_or_fused", T * K, w[0]) == "ragged_dot"
  large = dataclasses.replace(ragged_or_fused, limit_bytes=expansion - 1)
  assert large.pick(T * K, w[0]) is registry.get("fused")
  assert not large.picks_small(T * K, w[0])
  # Expert parallelism's grouped matmul follows the same rule.
  calls = []
  spy = lambda tag: backends.Backend(gmm=lambda lhs, rhs, gs: calls.append(tag), permute=None, combine=None)
  rule = backends.RaggedOrFusedBackend(gmm=None, permute=None, combine=None, small=spy("small"),
                                       large=spy("large"), limit_bytes=expansion)
  rule.gmm(jnp.zeros((T * K, D)), w[0], None)
  dataclasses.replace(rule, limit_bytes=expansion - 1).gmm(jnp.zeros((T * K, D)), w[0], None)
  assert calls == ["small", "large"]
  y = dropless_moe(x, Route(gates, idx, None, None), w, large)[0]
  np.testing.assert_allclose(y, loop_moe(x, idx, gates, *w), rtol=1e-5, atol=1e-5)


def test_capacity_priority_is_first_choice_first():
  # Expert 0 has one slot: token 1's first choice beats token 0's second choice.
  idx = jnp.array([[1, 0], [0, 1]])
  slots = capacity.assign_slots(idx, 2, cap=1)
  # Slot 0 (expert 0) holds token 1, slot 1 (expert 1) holds token 0.
  np.testing.assert_array_equal(slots.slot_token, [1, 0])
  np.testing.assert_array_equal(slots.pair_slot, [[1, 2], [0, 2]])
  assert int(slots.n_dropped) == 2


def test_permute_unpermute_round_trip():
  x, _ = make_weights()
  idx, gates = routings(5)["random"]
  r = sorting.sort_by_expert(idx, E)
  rows = sorting.permute(x, r, K)
  assert rows.shape == (T * K, D)
  experts_of_rows = np.asarray(idx).reshape(-1)[np.asarray(r.order)]
  assert np.all(np.diff(experts_of_rows) >= 0), "rows must be grouped by expert"
  np.testing.assert_array_equal(r.group_sizes, np.bincount(np.asarray(idx).ravel(), minlength=E))
  back = sorting.unpermute(rows, r, gates)
  np.testing.assert_allclose(back, x * jnp.sum(gates, -1, keepdims=True), rtol=1e-6)
