"""The fused CPU path (moe.fused_moe) against the one-expert-at-a-time loop reference,
forward and VJP, with routings fuzzed by hypothesis: empty experts, every row on one
expert, groups shorter than, equal to and longer than a chunk, f32 and bf16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from moe.dispatch import fused_loop
from moe.dispatch.sorting import SortedRouting, sort_by_expert
from tests.reference import loop_moe

T, D, F, E = 13, 16, 8, 5
# chunk/quantum small enough that full chunks, every tail size and empty tails all occur.
CHUNKINGS = [fused_loop.Chunking(8, 4), fused_loop.Chunking(4, 4)]
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
FUZZ = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def routings(draw):
  """[T, K'] expert choices (distinct per token) drawn from a random subset of experts."""
  k = draw(st.sampled_from([1, 2, 3]))
  kind = draw(st.sampled_from(["random", "one_expert", "few_experts"]))
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  if kind == "one_expert":
    k = 1
    pool = [draw(st.integers(0, E - 1))]
  elif kind == "few_experts":
    pool = list(rng.choice(E, size=k, replace=False))   # the rest stay empty
  else:
    pool = list(range(E))
  idx = np.stack([rng.choice(pool, size=k, replace=False) for _ in range(T)])
  gates = rng.uniform(0.1, 1.0, idx.shape)
  return idx, gates


def operands(seed, dtype):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (T, D)).astype(dtype)
  w = tuple((0.3 * jax.random.normal(kk, s)).astype(dtype)
            for kk, s in zip(ks[1:], [(E, D, F), (E, D, F), (E, F, D)]))
  return x, w


def assert_close(a, b, dtype):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
  np.testing.assert_allclose(a, b, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@functools.partial(jax.jit, static_argnums=0)
def fused_and_grads(chunking, x, gates, w, d_out, order, group_sizes):
  routing = SortedRouting(order, group_sizes)
  fused = lambda x, g, w: fused_loop.fused_swiglu_experts(x, routing, g, *w, chunking=chunking)
  out, vjp = jax.vjp(fused, x, gates, w)
  return out, vjp(d_out)


@jax.jit
def reference_and_grads(x, gates, w, d_out, idx):
  def reference(x, g, w):  # f32 throughout, from the same (possibly bf16) inputs
    f32 = lambda a: a.astype(jnp.float32)
    return loop_moe(f32(x), idx, g, *map(f32, w)).astype(x.dtype)
  out, vjp = jax.vjp(reference, x, gates, w)
  return out, vjp(d_out)


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=lambda c: f"chunk{c.chunk}q{c.quantum}")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@FUZZ
@given(routing=routings(), seed=st.integers(0, 3))
def test_fused_matches_loop_reference(chunking, dtype, routing, seed):
  idx, gates = jnp.asarray(routing[0]), jnp.asarray(routing[1], jnp.float32)
  x, w = operands(seed, dtype)
  d_out = jax.random.normal(jax.random.key(seed + 7), x.shape).astype(dtype)
  sorted_routing = sort_by_expert(idx, E)
  out, grads = fused_and_grads(chunking, x, gates, w, d_out, *sorted_routing)
  ref, ref_grads = reference_and_grads(x, gates, w, d_out, idx)
  assert out.dtype == dtype
  assert_close(out, ref, dtype)
  grads, ref_grads = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
  for name, g, r in zip(["x", "gates", "w_gate", "w_up", "w_down"], grads, ref_grads):
    assert g.dtype == r.dtype, name
    assert_close(g, r, dtype)
  empty = sorted(set(range(E)) - set(np.asarray(idx).ravel().tolist()))
  for dw in grads[2:]:
    assert not np.any(np.asarray(dw, np.float32)[empty]), "empty experts must get exactly zero"


def test_tail_sizes_cover_every_branch():
  # Group sizes 0..2*chunk+1 on one chunking: full chunks, every tail length, empty tails.
  c = fused_loop.Chunking(4, 2)
  sizes = np.arange(10)
  idx = jnp.asarray(np.repeat(np.arange(10), sizes)[:, None])
  n = idx.shape[0]
  x = jax.random.normal(jax.random.key(0), (n, D))
  ks = jax.random.split(jax.random.key(1), 3)
  w = (jax.random.normal(ks[0], (10, D, F)), jax.random.normal(ks[1], (10, D, F)),
       jax.random.normal(ks[2], (10, F, D)))
  gates = jnp.full((n, 1), 0.5)
  out = fused_loop.fused_swiglu_experts(x, sort_by_expert(idx, 10), gates, *w, chunking=c)
  np.testing.assert_allclose(out, loop_moe(x, idx, gates, *w), rtol=1e-5, atol=1e-4)
