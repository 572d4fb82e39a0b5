"""The C++ FFI CPU kernel (moe.dispatch.cpu_kernel) against the loop reference, forward and VJP, on the
same hypothesis-fuzzed routings as the fused loop (empty experts, one expert holding every
row, K' = 1..3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from moe.dispatch import cpu_kernel, registry
from moe.dispatch.sorting import SortedRouting, sort_by_expert
from tests.reference import loop_moe
from tests.test_fused_moe import E, FUZZ, assert_close, operands, reference_and_grads, routings

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason=f"cpu_ffi unavailable: {cpu_kernel.status()}")


@jax.jit
def ffi_and_grads(x, gates, w, d_out, order, group_sizes):
  routing = SortedRouting(order, group_sizes)
  out, vjp = jax.vjp(lambda x, g, w: cpu_kernel.ffi_swiglu_experts(x, routing, g, *w), x, gates, w)
  return out, vjp(d_out)


@needs_kernel
@FUZZ
@given(routing=routings(), seed=st.integers(0, 3))
def test_ffi_matches_loop_reference(routing, seed):
  idx, gates = jnp.asarray(routing[0]), jnp.asarray(routing[1], jnp.float32)
  x, w = operands(seed, jnp.float32)
  d_out = jax.random.normal(jax.random.key(seed + 7), x.shape)
  out, grads = ffi_and_grads(x, gates, w, d_out, *sort_by_expert(idx, E))
  ref, ref_grads = reference_and_grads(x, gates, w, d_out, idx)
  assert_close(out, ref, jnp.float32)
  grads = jax.tree.leaves(grads)
  for g, r in zip(grads, jax.tree.leaves(ref_grads)):
    assert_close(g, r, jnp.float32)
  empty = sorted(set(range(E)) - set(np.asarray(idx).ravel().tolist()))
  for dw in grads[2:]:
    assert not np.any(np.asarray(dw)[empty]), "empty experts must get exactly zero"


@needs_kernel
def test_backend_runs_other_dtypes_through_the_fused_loop():
  x, w = operands(0, jnp.bfloat16)
  idx = jnp.asarray(np.stack([np.arange(2) + t % 3 for t in range(x.shape[0])]))
  gates = jnp.full(idx.shape, 0.5)
  out = registry.get("cpu_ffi").experts(x, sort_by_expert(idx, E), gates, w)
  assert out.dtype == jnp.bfloat16
  ref = loop_moe(x.astype(jnp.float32), idx, gates, *(a.astype(jnp.float32) for a in w))
  assert_close(out, ref, jnp.bfloat16)


def test_unavailable_kernel_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(cpu_kernel, "status", lambda: "no C++ compiler (set CXX or install g++)")
  x, w = operands(0, jnp.float32)
  idx = jnp.zeros((x.shape[0], 1), jnp.int32)
  with pytest.raises(RuntimeError, match="cpu_ffi' is unavailable here: no C\\+\\+ compiler"):
    cpu_kernel.ffi_swiglu_experts(x, sort_by_expert(idx, E), jnp.ones(idx.shape), *w)


def _malformed_routings(n_rows: int, n_tokens: int):
  """(what is wrong, order [n_rows], group_sizes [E]) for K' = 1 (token of row r = order[r])."""
  order = np.arange(n_rows, dtype=np.int32) % n_tokens
  fits = np.full(E, n_rows // E, np.int32)
  fits[0] += n_rows - fits.sum()
  negative, too_many = fits.copy(), fits.copy()
  negative[2] += negative[1] + 1  # the rows still add up: only the sign is wrong
  negative[1] = -1
  too_many[0] += 1
  bad_token = order.copy()
  bad_token[n_rows // 2] = n_tokens + 3
  return [("is negative", order, negative),
          (f"sum to {n_rows + 1} but only {n_rows} rows", order, too_many),
          (f"names token {n_tokens + 3}, outside", bad_token, fits)]


@needs_kernel
def test_malformed_routing_is_an_error_not_a_crash():
  x, w = operands(0, jnp.float32)
  t = x.shape[0]
  gates = jnp.ones((t, 1), jnp.float32)
  for problem, order, sizes in _malformed_routings(t, t):
    routing = SortedRouting(jnp.asarray(order), jnp.asarray(sizes))
    with pytest.raises(Exception, match=f"ExpertSwigluForward: .*{problem}"):
      jax.block_until_ready(cpu_kernel.ffi_swiglu_experts(x, routing, gates, *w))
    grad = jax.grad(lambda x: jnp.sum(cpu_kernel.ffi_swiglu_experts(x, routing, gates, *w)))
    with pytest.raises(Exception, match=f"ExpertSwiglu(Forward|Backward): .*{problem}"):
      jax.block_until_ready(grad(x))
  # Well-formed input still runs after the errors.
  ok = sort_by_expert(jnp.zeros((t, 1), jnp.int32), E)
  assert np.all(np.isfinite(np.asarray(cpu_kernel.ffi_swiglu_experts(x, ok, gates, *w))))
