"""Multi-head causal self-attention with rotate-half rotary embeddings, no biases, over
packed sequences (attention stays within a document)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.model.config import ModelConfig
from moe.model.layers import param


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotate-half RoPE. x: [B, S, H, Dh], positions: [B, S] -> [B, S, H, Dh]."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / x.shape[-1]))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq           # [B, S, Dh/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
  """segment_ids: [B, S] -> [B, 1, S, S] bool: causal and within the same packed document."""
  s = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((s, s), bool))
  same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (causal[None] & same_doc)[:, None]


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
    return rotary(q, positions, self.cfg.rope_theta), rotary(k, positions, self.cfg.rope_theta), v

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q: [B, Sq, H, Dh], k, v: [B, H, Sk, Dh], mask: [B, 1, Sq, Sk] -> [B, Sq, d_model].
    Heads before length: a KV cache's layout (moe.decode, Sk > Sq), which the dots then
    read without transposing it."""
    dtype = q.dtype
    scores = jnp.einsum("bqhk,bhsk->bhqs", q, k.astype(dtype), preferred_element_type=jnp.float32)
    scores = scores * (self.cfg.head_dim ** -0.5)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bhqs,bhsk->bqhk", probs, v.astype(dtype))
    return jnp.einsum("bshk,hkd->bsd", out, self.wo[...].astype(dtype))

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    """x: [B, S, d_model], positions: [B, S], mask: [B, 1, S, S] -> [B, S, d_model]."""
    q, k, v = self.project(x, positions)
    return self.attend(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask)
