"""A dense SwiGLU FFN as a C++ XLA FFI kernel on CPU (cpu_swiglu.cc, beside this file): the
FFN backend `cpu_ffi`, CPU's default where the kernel builds. Used by the dense model's FFN
and DeepSeekMoE's fused shared experts (moe.model.layers.SwiGLU).

Each thread takes a block of token rows; XLA:CPU's version of the same function spends a
third of its FFN time on transposed copies of the [T, f] activations and elementwise
passes (docs/bench_train.md). Same function as moe.dispatch.experts.swiglu; f32 only.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moe import cpu_build
from moe.parallel import mesh as meshes

_SOURCE = os.path.join(os.path.dirname(__file__), "cpu_swiglu.cc")
_KERNEL = cpu_build.Kernel(_SOURCE, ("DenseSwigluForward", "DenseSwigluBackward"))
status, available = _KERNEL.status, _KERNEL.available  # None / True once built and registered
_ROWS_PER_THREAD = 64  # fewer rows than this per thread are not worth waking a thread for


def _threads(x) -> int:
  return cpu_build.threads(max(1, x.shape[0] // _ROWS_PER_THREAD))


def _shape(a) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(a.shape, jnp.float32)


def _forward(x, w_gate, w_up, w_down):
  ab = jax.ShapeDtypeStruct((x.shape[0], 2 * w_gate.shape[1]), jnp.float32)
  return jax.ffi.ffi_call("DenseSwigluForward", (_shape(x), ab), vmap_method="sequential")(
      x, w_gate, w_up, w_down, threads=np.int64(_threads(x)))


@jax.custom_vjp
def _swiglu(x, w_gate, w_up, w_down):
  return _forward(x, w_gate, w_up, w_down)[0]


def _swiglu_fwd(x, w_gate, w_up, w_down):
  out, ab = _forward(x, w_gate, w_up, w_down)
  return out, (x, w_gate, w_up, w_down, ab)


def _swiglu_bwd(res, d_out):
  x, w_gate, w_up, w_down, ab = res
  shapes = tuple(map(_shape, (x, w_gate, w_up, w_down)))
  return tuple(jax.ffi.ffi_call("DenseSwigluBackward", shapes, vmap_method="sequential")(
      x, w_gate, w_up, w_down, ab, d_out.astype(jnp.float32), threads=np.int64(_threads(x))))


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def cpu_ffi(x, w_gate, w_up, w_down, fallback=None):
  """x: [..., d] with w_gate, w_up: [d, f] and w_down: [f, d] -> [..., d]. Non-f32 inputs
  take `fallback`. On a mesh, per shard of the tokens and of f over `tensor` (a custom call
  is not partitioned by XLA), the partial outputs summed over `tensor`."""
  if any(a.dtype != jnp.float32 for a in (x, w_gate, w_up, w_down)):
    return fallback(x, w_gate, w_up, w_down)
  problem = status()
  if problem is not None:
    raise RuntimeError(f"FFN backend 'cpu_ffi' is unavailable here: {problem}")
  rows = x.reshape(-1, x.shape[-1])
  mesh = meshes.active_mesh()
  if mesh is None:
    return _swiglu(rows, w_gate, w_up, w_down).reshape(x.shape)

  def local(rows, w_gate, w_up, w_down):
    return jax.lax.psum(_swiglu(rows, w_gate, w_up, w_down), "tensor")

  out = jax.shard_map(local, mesh=mesh,
                      in_specs=(P(meshes.BATCH_AXES, None), P(None, "tensor"), P(None, "tensor"),
                                P("tensor", None)),
                      out_specs=P(meshes.BATCH_AXES, None), check_vma=False)(rows, w_gate, w_up, w_down)
  return out.reshape(x.shape)
