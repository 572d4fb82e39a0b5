"""The C++ FFI CPU kernel (moe.dispatch.cpu_kernel) against the loop reference, forward and VJP, on the
same hypothesis-fuzzed routings as the fused loop (empty experts, one expert holding every
row, K' = 1..3); then rows past sum(group_sizes), thread counts the kernel must refuse, and the
build cache key (CPU instruction set, source)."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from moe import cpu_build
from moe.dispatch import cpu_kernel, registry
from moe.dispatch.sorting import SortedRouting, row_tokens_and_gates, sort_by_expert
from tests.capabilities import skip_or_fail
from tests.reference import loop_moe
from tests.test_fused_moe import E, FUZZ, assert_close, operands, reference_and_grads, routings

needs_kernel = pytest.mark.usefixtures("built_kernel")


@pytest.fixture
def built_kernel():
  if not cpu_kernel.available():
    skip_or_fail("cpu_kernel", f"cpu_ffi unavailable: {cpu_kernel.status()}")


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


def _dirty_heap(*shapes):
  """Frees NaN-filled f32 buffers of these shapes, where the next outputs of those sizes are
  likely allocated: an output element the kernel does not write then reads back as junk."""
  junk = [jnp.full(s, jnp.nan, jnp.float32) + 0 for s in shapes for _ in range(4)]
  jax.block_until_ready(junk)


@jax.jit
def _reference_with_keep(x, gates, w, d_out, idx, keep):
  out, vjp = jax.vjp(lambda x, g, w: loop_moe(x, idx, g, *w, keep=keep), x, gates, w)
  return out, vjp(d_out)


@needs_kernel
def test_padding_rows_are_unrouted_with_zero_gradients():
  """Rows past sum(group_sizes) (dropped choices sorted to the end) reach no expert: the
  output ignores them and their gates' gradients, and saved pre-activations, are exactly 0."""
  x, w = operands(1, jnp.float32)
  rng = np.random.default_rng(0)
  idx = np.stack([rng.choice(E, size=2, replace=False) for _ in range(x.shape[0])]).astype(np.int32)
  keep = rng.uniform(size=idx.shape) < 0.6
  keep[0] = [True, False]  # at least one padding row, one routed row
  gates = jnp.asarray(rng.uniform(0.1, 1.0, idx.shape), jnp.float32)
  order = np.argsort(np.where(keep, idx, E).ravel(), stable=True).astype(np.int32)
  sizes = np.bincount(idx[keep], minlength=E).astype(np.int32)
  routing = SortedRouting(jnp.asarray(order), jnp.asarray(sizes))
  d_out = jax.random.normal(jax.random.key(3), x.shape)
  ref, ref_grads = _reference_with_keep(x, gates, w, d_out, jnp.asarray(idx), jnp.asarray(keep))
  rows, total, f = idx.size, int(sizes.sum()), w[0].shape[2]
  assert total < rows
  tok, gate_rows = row_tokens_and_gates(routing, gates)
  for _ in range(3):  # eager, so each output is a fresh allocation the heap may have dirtied
    _dirty_heap((rows, 2 * f), x.shape)
    out, ab = cpu_kernel._forward(x, tok, gate_rows, *w, routing.group_sizes)
    assert np.all(np.asarray(ab)[total:] == 0), "saved rows past the total must be zero"
    assert np.all(np.isfinite(np.asarray(ab)[:total]))
    assert_close(out, ref, jnp.float32)
    out, vjp = jax.vjp(lambda x, g, w: cpu_kernel.ffi_swiglu_experts(x, routing, g, *w), x, gates, w)
    _dirty_heap((rows,), x.shape, *(a.shape for a in w))
    grads = vjp(d_out)
    assert_close(out, ref, jnp.float32)
    d_gates = np.asarray(grads[1])
    assert np.all(d_gates[~keep] == 0), "gates of padding rows must get exactly zero"
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      assert_close(g, r, jnp.float32)


def _call_target(name: str, threads: int):
  """The FFI target called directly with a well-formed routing and the given thread count."""
  x, w = operands(0, jnp.float32)
  rows = x.shape[0]
  tok, gate = jnp.arange(rows, dtype=jnp.int32), jnp.ones((rows,), jnp.float32)
  sizes = jnp.asarray(np.bincount(np.arange(rows) % E, minlength=E), jnp.int32)
  args = (x, tok, gate, *w, sizes)
  if name == "ExpertSwigluForward":
    shapes = (x, jnp.zeros((rows, 2 * w[0].shape[2])))
  else:
    args += (jnp.zeros((rows, 2 * w[0].shape[2])), jnp.ones_like(x))
    shapes = (x, gate, *w)
  shapes = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in shapes)
  return jax.ffi.ffi_call(name, shapes)(*args, threads=np.int64(threads))


@needs_kernel
@pytest.mark.parametrize("name", ["ExpertSwigluForward", "ExpertSwigluBackward"])
def test_thread_counts_the_pool_cannot_run_are_refused(name):
  result = {}

  def run():  # on a daemon thread: a kernel that spins on threads = 0 fails here, not hangs
    for threads in (0, -1, 5000):
      try:
        jax.block_until_ready(_call_target(name, threads))
        result[threads] = "ran"
      except jax.errors.JaxRuntimeError as e:
        result[threads] = str(e)

  worker = threading.Thread(target=run, daemon=True)
  worker.start()
  worker.join(timeout=120)
  assert not worker.is_alive(), f"{name} hung on a bad thread count: {result}"
  for threads in (0, -1, 5000):
    assert f"{name}: threads = {threads} is outside [1, 4096]" in result[threads], result[threads]
  assert np.all(np.isfinite(np.asarray(_call_target(name, 3)[0])))  # still runs afterwards


def test_thread_count_is_at_least_one(monkeypatch):
  monkeypatch.setattr(cpu_kernel.os, "sched_getaffinity", lambda pid: set(), raising=False)
  assert cpu_kernel._threads(0) == 1
  assert cpu_kernel._threads(5) == 1
  monkeypatch.setattr(cpu_kernel.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
  assert cpu_kernel._threads(0) == 1
  assert cpu_kernel._threads(64) == 8


X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse sse2 avx avx2 avx512f
bugs\t\t: sysret_ss_attrs

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse sse2 avx avx2 avx512f
"""

ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid {extra}
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd40
CPU revision\t: 1
"""

OLD_ARM = """Processor\t: AArch64 Processor rev 4 (aarch64)
processor\t: 0
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: {part}
"""


def test_cpu_key_is_the_instruction_set_on_every_architecture():
  assert "avx512f" in cpu_build.cpu_key(X86)
  assert cpu_build.cpu_key(X86) != cpu_build.cpu_key(X86.replace(" avx512f", ""))
  sve, no_sve = ARM.format(extra="sve sve2"), ARM.format(extra="")
  assert "asimd" in cpu_build.cpu_key(sve)
  # Two ARM CPUs told apart by their Features line alone (same implementer and part).
  assert cpu_build.cpu_key(sve) != cpu_build.cpu_key(no_sve)
  assert cpu_build.cpu_key(sve) == cpu_build.cpu_key(ARM.format(extra="sve  sve2"))
  # No feature line: the model lines.
  a53, a72 = (cpu_build.cpu_key(OLD_ARM.format(part=p)) for p in ("0xd03", "0xd08"))
  assert a53 != a72 and "CPU part: 0xd03" in a53
  assert cpu_build.cpu_key("") == ""


def test_kernel_build_key_follows_arm_features_and_source(monkeypatch, tmp_path):
  compiler = cpu_build.compiler()
  if compiler is None:
    skip_or_fail("cpu_kernel", "no C++ compiler")
  monkeypatch.setenv("MOE_CACHE_DIR", str(tmp_path))
  source = cpu_kernel._SOURCE
  lib = lambda: cpu_build.library_path(source, "/any/libblas.so", compiler)
  for extra, other in [("sve", "sve2"), ("", "sve")]:
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: cpu_build.cpu_key(ARM.format(extra=extra)))
    path = lib()
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: cpu_build.cpu_key(ARM.format(extra=other)))
    assert lib() != path
  # An edited kernel source, or shared header, is a new build.
  path = lib()
  edited = tmp_path / "expert_swiglu.cc"
  edited.write_text(open(cpu_kernel._SOURCE).read() + "// edited\n")
  source = str(edited)
  assert lib() != path
  path = lib()
  header = tmp_path / "cpu_kernels.h"
  header.write_text(open(cpu_build.HEADER).read() + "// edited\n")
  monkeypatch.setattr(cpu_build, "HEADER", str(header))
  assert lib() != path
