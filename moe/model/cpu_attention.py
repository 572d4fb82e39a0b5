"""Causal attention within packed documents as a C++ XLA FFI kernel on CPU (cpu_attention.cc,
beside this file): the attention backend `cpu_ffi`, CPU's default where the kernel builds.

XLA:CPU runs the reference's einsums as separate kernels with transposed copies of q, k and
v, the mask as a select over [B, H, S, S] and the softmax as several passes over it, forward
and backward; the kernel does each (example, head) in one thread's buffers and reads and
writes [B, S, H, Dh] in place. Same function as attention_backends.reference; f32 only
(other dtypes take the reference).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from moe import cpu_build
from moe.model import attention_backends

_SOURCE = os.path.join(os.path.dirname(__file__), "cpu_attention.cc")
_KERNEL = cpu_build.Kernel(_SOURCE, ("CausalAttentionForward", "CausalAttentionBackward"))
status, available = _KERNEL.status, _KERNEL.available  # None / True once built and registered


def _threads(q) -> int:
  return cpu_build.threads(q.shape[0] * q.shape[2])


def _forward(q, k, v, segment_ids):
  b, s, h, _ = q.shape
  shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, s), jnp.float32))
  return jax.ffi.ffi_call("CausalAttentionForward", shapes, vmap_method="sequential")(
      q, k, v, segment_ids, threads=np.int64(_threads(q)))


@jax.custom_vjp
def _attention(q, k, v, segment_ids):
  return _forward(q, k, v, segment_ids)[0]


def _attention_fwd(q, k, v, segment_ids):
  out, lse = _forward(q, k, v, segment_ids)
  return out, (q, k, v, segment_ids, out, lse)


def _attention_bwd(res, d_out):
  q, k, v, segment_ids, out, lse = res
  shape = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  dq, dk, dv = jax.ffi.ffi_call("CausalAttentionBackward", (shape, shape, shape), vmap_method="sequential")(
      q, k, v, segment_ids, out, lse, d_out.astype(jnp.float32), threads=np.int64(_threads(q)))
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def cpu_ffi(q, k, v, segment_ids):
  """q, k, v: [B, S, H, Dh] (q and k rotated), segment_ids: [B, S] -> [B, S, H, Dh].
  Non-f32 inputs take the reference. On a mesh, per shard of the batch and heads (a custom
  call is not partitioned by XLA)."""
  if q.dtype != jnp.float32 or k.dtype != jnp.float32 or v.dtype != jnp.float32:
    return attention_backends.reference(q, k, v, segment_ids)
  problem = status()
  if problem is not None:
    raise RuntimeError(f"attention backend 'cpu_ffi' is unavailable here: {problem}")
  return attention_backends.per_shard(_attention, q, k, v, segment_ids.astype(jnp.int32))
