"""Multi-head causal self-attention with rotate-half rotary embeddings, no biases, over
packed sequences (attention stays within a document). The attention itself is a backend
per platform (moe.model.attention_backends); `attend` is the reference over a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.model import attention_backends
from moe.model.config import ModelConfig
from moe.model.layers import param
from moe.parallel import mesh as meshes


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """positions: [B, S] -> cos, sin: [B, S, 1, Dh/2] of rotate-half RoPE. Materialised once
  (optimization_barrier): left to fusion, XLA:CPU recomputes the sin and cos inside every
  fusion that rotates, per element of q and k."""
  half = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq           # [B, S, Dh/2]
  return jax.lax.optimization_barrier((jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]))


@jax.custom_vjp
def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _rotate_fwd(x, cos, sin):
  return _rotate(x, cos, sin), (cos, sin)


def _rotate_bwd(res, dy):
  # The transpose of a rotation is the rotation by minus the angle: one more concatenation,
  # where autodiff's transpose of the concatenation is pads and adds.
  cos, sin = res
  return _rotate(dy, cos, -sin), None, None


_rotate.defvjp(_rotate_fwd, _rotate_bwd)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotate-half RoPE. x: [B, S, H, Dh], positions: [B, S] -> [B, S, H, Dh]."""
  return _rotate(x, *rope_angles(positions, x.shape[-1], theta))


class Attention(nnx.Module):
  """Multi-head causal self-attention with rotary embeddings, no biases."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.head_dim
    self.wq = param(rngs, cfg, (d, h, dh), ("embed", "heads", "head_dim"))
    self.wk = param(rngs, cfg, (d, h, dh), ("embed", "heads", "head_dim"))
    self.wv = param(rngs, cfg, (d, h, dh), ("embed", "heads", "head_dim"))
    self.wo = param(rngs, cfg, (h, dh, d), ("heads", "head_dim", "embed"))

  def project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x: [B, S, d_model], positions: [B, S] -> q, k, v [B, S, H, Dh], q and k rotated."""
    dtype = x.dtype
    q = jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(dtype))
    k = jnp.einsum("bsd,dhk->bshk", x, self.wk[...].astype(dtype))
    v = jnp.einsum("bsd,dhk->bshk", x, self.wv[...].astype(dtype))
    cos, sin = rope_angles(positions, self.cfg.head_dim, self.cfg.rope_theta)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q: [B, Sq, H, Dh], k, v: [B, H, Sk, Dh], mask: [B, 1, Sq, Sk] -> [B, Sq, d_model]:
    the reference over a KV cache (moe.decode, Sk > Sq)."""
    return self.output(attention_backends.masked(q, k, v, mask))

  def output(self, out: jax.Array) -> jax.Array:
    """out: [B, S, H, Dh] per-head attention -> [B, S, d_model]."""
    return jnp.einsum("bshk,hkd->bsd", out, self.wo[...].astype(out.dtype))

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """x: [B, S, d_model], positions, segment_ids: [B, S] -> [B, S, d_model]."""
    q, k, v = self.project(x, positions)
    attend = attention_backends.resolve(self.cfg.attention_backend, meshes.target_platform())
    return self.output(attend(q, k, v, segment_ids))
