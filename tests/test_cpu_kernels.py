"""The CPU FFI kernels of the model (moe/model/cpu_attention.cc, cpu_swiglu.cc) against the
XLA functions they replace: forward and VJP, fuzzed shapes, packed documents, thread splits,
meshes, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moe.dispatch.experts import swiglu
from moe.model import attention_backends as ab
from moe.model import cpu_attention, cpu_swiglu, layers
from moe.model.config import ModelConfig
from moe.parallel.mesh import MeshConfig, make_mesh, use_mesh
from tests.capabilities import skip_or_fail


@pytest.fixture(autouse=True)
def needs_kernels():
  for kernel in (cpu_attention, cpu_swiglu):
    if not kernel.available():
      skip_or_fail("cpu_kernel", f"{kernel.__name__} unavailable: {kernel.status()}")


def vjp(fn, *args):
  """fn(*args) and its VJP of a fixed random cotangent, jitted."""
  out = jax.eval_shape(fn, *args)
  d_out = jax.random.normal(jax.random.key(9), out.shape, out.dtype)
  return jax.jit(lambda *a: (lambda o, f: (o, f(d_out)))(*jax.vjp(fn, *a)))(*args)


def assert_close(got, want, tol):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    scale = max(1.0, float(jnp.abs(w).max()))
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol * scale)


def qkv(b, s, h, dh, n_docs, seed):
  ks = jax.random.split(jax.random.key(seed), 3)
  q, k, v = (jax.random.normal(key, (b, s, h, dh), jnp.float32) for key in ks)
  rng = np.random.default_rng(seed)
  # Packed rows: documents of random lengths; each row its own cuts.
  seg = np.stack([np.searchsorted(np.sort(rng.choice(np.arange(1, s + 1), n_docs, replace=True)), np.arange(s),
                                  side="right") for _ in range(b)])
  return q, k, v, jnp.asarray(seg, jnp.int32)


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 3), s=st.sampled_from([1, 7, 32, 65]), h=st.integers(1, 3),
       dh=st.sampled_from([4, 16, 32]), n_docs=st.integers(0, 4), seed=st.integers(0, 99))
def test_attention_kernel_equals_the_reference(b, s, h, dh, n_docs, seed):
  q, k, v, seg = qkv(b, s, h, dh, n_docs, seed)
  fn = lambda f: (lambda q, k, v: f(q, k, v, seg))
  assert_close(vjp(fn(ab.cpu_ffi), q, k, v), vjp(fn(ab.reference), q, k, v), 2e-5)


def test_attention_of_very_different_scores_stays_finite_and_exact():
  """Scores spread over +-80 (softmax underflow for most keys): the kernel's exp must keep
  the reference's probabilities, zeros included."""
  q, k, v, seg = qkv(2, 48, 2, 16, 2, 3)
  q = q * 9.0
  fn = lambda f: (lambda q, k, v: f(q, k, v, seg))
  got, want = vjp(fn(ab.cpu_ffi), q, k, v), vjp(fn(ab.reference), q, k, v)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(got))
  assert_close(got, want, 1e-4)


def test_attention_kernel_on_a_mesh_of_batch_and_heads():
  q, k, v, seg = qkv(4, 32, 4, 8, 3, 1)
  mesh = make_mesh(MeshConfig("data:2,tensor:2"), jax.devices()[:4])
  fn = lambda f: (lambda q, k, v: f(q, k, v, seg))
  with use_mesh(mesh):
    got = vjp(fn(ab.cpu_ffi), q, k, v)
  assert_close(got, vjp(fn(ab.reference), q, k, v), 2e-5)


def test_bf16_attention_takes_the_reference():
  q, k, v, seg = (a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a for a in qkv(1, 16, 2, 8, 1, 0))
  np.testing.assert_array_equal(np.asarray(ab.cpu_ffi(q, k, v, seg), np.float32),
                                np.asarray(ab.reference(q, k, v, seg), np.float32))


def ffn_weights(d, f, seed):
  ks = jax.random.split(jax.random.key(seed), 4)
  return [0.2 * jax.random.normal(k, s, jnp.float32) for k, s in zip(ks, [(d, f), (d, f), (f, d)])]


@pytest.mark.parametrize("tokens", [1, 63, 64, 129, 1000])  # one thread, the split, uneven halves
def test_swiglu_kernel_equals_xla(tokens):
  w = ffn_weights(24, 40, tokens)
  x = jax.random.normal(jax.random.key(tokens), (tokens, 24), jnp.float32) * 3
  assert_close(vjp(cpu_swiglu.cpu_ffi, x, *w), vjp(swiglu, x, *w), 2e-5)


def test_swiglu_kernel_on_a_mesh_with_the_width_over_tensor():
  w = ffn_weights(16, 32, 0)
  x = jax.random.normal(jax.random.key(1), (4, 10, 16), jnp.float32)  # [B, S, d]: rows flattened
  mesh = make_mesh(MeshConfig("data:2,tensor:2"), jax.devices()[:4])
  with use_mesh(mesh):
    got = vjp(cpu_swiglu.cpu_ffi, x, *w)
  assert_close(got, vjp(swiglu, x, *w), 2e-5)


def test_ffn_backend_is_chosen_by_config_and_platform():
  assert layers.ffn_function("xla", "cpu") is swiglu
  assert layers.ffn_function("auto", "tpu") is swiglu
  assert layers.ffn_function("auto", "cpu") is not swiglu  # the kernel builds here
  with pytest.raises(ValueError, match="unknown FFN backend"):
    layers.ffn_function("onednn", "cpu")
  with pytest.raises(ValueError, match="ffn_backend"):
    ModelConfig(ffn_backend="onednn")


def test_kernels_name_the_bad_shape():
  q = jnp.zeros((2, 8, 2, 4), jnp.float32)
  bad_seg = jnp.zeros((2, 7), jnp.int32)
  with pytest.raises(Exception, match=r"segment_ids \[2, 7\] must be \[B, S\]"):
    jax.block_until_ready(cpu_attention._forward(q, q, q, bad_seg))
  x, w = jnp.zeros((5, 6), jnp.float32), ffn_weights(6, 4, 0)
  with pytest.raises(Exception, match=r"w_down \[6, 4\] must be \[f, d\]"):
    jax.block_until_ready(cpu_swiglu._forward(x, w[0], w[1], w[0]))
