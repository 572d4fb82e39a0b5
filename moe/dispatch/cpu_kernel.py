"""Routed SwiGLU experts through a C++ XLA FFI kernel on CPU (expert_swiglu.cc, beside this file).

Each thread takes whole experts and runs their matmuls single-threaded, where XLA:CPU splits
every small per-expert matmul over all cores and scales poorly at DeepSeekMoE's expert sizes
(docs/bench_moe.md). The kernel is built on first use (moe.cpu_build); `status()` says why it
is unavailable where it cannot be built. f32 only.

The kernel never reads expert indices: it takes rows by group_sizes, and the rows past
sum(group_sizes) ("no expert" pairs, moe.dispatch.sorting) are padding it neither gathers
nor multiplies (their saved rows and gate gradients are written as exact zeros).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from moe import cpu_build
from moe.dispatch import fused_loop
from moe.dispatch.backend import Backend
from moe.dispatch.sorting import SortedRouting, row_tokens_and_gates

_SOURCE = os.path.join(os.path.dirname(__file__), "expert_swiglu.cc")
_KERNEL = cpu_build.Kernel(_SOURCE, ("ExpertSwigluForward", "ExpertSwigluBackward"))
status, available = _KERNEL.status, _KERNEL.available  # None / True once built and registered


def _threads(n_experts: int) -> int:
  """Experts run whole on one thread each: see cpu_build.threads."""
  return cpu_build.threads(n_experts)


def _shape(a) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(a.shape, jnp.float32)


def _forward(x, tok, gate, w_gate, w_up, w_down, group_sizes):
  ab = jax.ShapeDtypeStruct((tok.shape[0], 2 * w_gate.shape[2]), jnp.float32)
  return jax.ffi.ffi_call("ExpertSwigluForward", (_shape(x), ab), vmap_method="sequential")(
      x, tok, gate, w_gate, w_up, w_down, group_sizes, threads=np.int64(_threads(w_gate.shape[0])))


@jax.custom_vjp
def _experts(x, tok, gate, w_gate, w_up, w_down, group_sizes):
  return _forward(x, tok, gate, w_gate, w_up, w_down, group_sizes)[0]


def _experts_fwd(x, tok, gate, w_gate, w_up, w_down, group_sizes):
  out, ab = _forward(x, tok, gate, w_gate, w_up, w_down, group_sizes)
  return out, (x, tok, gate, w_gate, w_up, w_down, group_sizes, ab)


def _experts_bwd(res, d_out):
  x, tok, gate, w_gate, w_up, w_down, group_sizes, ab = res
  shapes = tuple(map(_shape, (x, gate, w_gate, w_up, w_down)))
  grads = jax.ffi.ffi_call("ExpertSwigluBackward", shapes, vmap_method="sequential")(
      x, tok, gate, w_gate, w_up, w_down, group_sizes, ab, d_out.astype(jnp.float32),
      threads=np.int64(_threads(w_gate.shape[0])))
  dx, d_gate, d_wg, d_wu, d_wd = grads
  return dx, None, d_gate, d_wg, d_wu, d_wd, None


_experts.defvjp(_experts_fwd, _experts_bwd)


def ffi_swiglu_experts(x: jax.Array, routing: SortedRouting, gates: jax.Array, w_gate: jax.Array,
                       w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """x: [T, d] f32, gates: [T, K'], w_gate/w_up: [E, d, f], w_down: [E, f, d] -> [T, d].

  The same function as moe.dispatch.fused_loop.fused_swiglu_experts; a token's K' experts distinct.
  """
  problem = status()
  if problem is not None:
    raise RuntimeError(f"dispatch 'cpu_ffi' is unavailable here: {problem}")
  if jax.default_backend() != "cpu":
    raise RuntimeError(f"dispatch 'cpu_ffi' runs on CPU only, not {jax.default_backend()}")
  tok, gate_rows = row_tokens_and_gates(routing, gates)
  return _experts(x, tok, gate_rows, w_gate, w_up, w_down, routing.group_sizes.astype(jnp.int32))


class CpuKernelBackend(Backend):
  """The routed experts as one C++ XLA FFI call per pass, experts spread over CPU threads;
  f32 only, other dtypes run the fused loop."""

  def experts(self, x, routing, gates, weights):
    if x.dtype != jnp.float32 or any(w.dtype != jnp.float32 for w in weights):
      return fused_loop.fused_swiglu_experts(x, routing, gates, *weights)
    with jax.named_scope("routed_experts"):  # gathers and scatters included: one kernel
      return ffi_swiglu_experts(x, routing, gates, *weights)
