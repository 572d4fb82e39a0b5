"""Choosing the next token from logits: greedy, or sampled at a temperature from the top-k
and/or top-p (nucleus) of the distribution. Every setting is a traced value, so changing
it does not recompile.

    greedy:      temperature == 0 -> argmax
    temperature: softmax(logits / t)
    top-k:       only the k highest logits (k <= 0: off); ties with the k-th stay in
    top-p:       the fewest highest-probability tokens whose mass reaches p (p >= 1: off);
                 the most likely token always stays in
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


class Sampling(NamedTuple):
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0            # <= 0: no top-k cut
  top_p: float = 1.0        # >= 1: no top-p cut

  def arrays(self) -> "Sampling":
    """As jit arguments (scalars of fixed dtypes, so a new value never recompiles)."""
    return Sampling(jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p))


def top_k_mask(logits: jax.Array, k: jax.Array) -> jax.Array:
  """logits: [B, V] -> logits with everything below the k-th highest set to -inf (k <= 0: as is)."""
  desc = -jnp.sort(-logits, axis=-1)
  kth = jnp.take_along_axis(desc, jnp.clip(k - 1, 0, logits.shape[-1] - 1)[None, None], axis=-1)
  return jnp.where((k > 0) & (logits < kth), NEG_INF, logits)


def top_p_mask(logits: jax.Array, p: jax.Array) -> jax.Array:
  """logits: [B, V] -> logits outside the smallest set of top tokens with probability mass
  >= p set to -inf (p >= 1: as is)."""
  desc = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
  n_keep = jnp.maximum(jnp.sum(before < p, axis=-1, keepdims=True), 1)
  cutoff = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
  return jnp.where((p < 1.0) & (logits < cutoff), NEG_INF, logits)


def sample(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
  """logits: [B, V] fp32 -> next tokens [B] int32 (one key; rows draw independently)."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw(logits):
    scaled = logits / jnp.maximum(s.temperature, 1e-6)
    # The sorts are skipped unless a cut is asked for (they cost O(V log V) per row).
    scaled = jax.lax.cond(s.top_k > 0, top_k_mask, lambda l, _: l, scaled, s.top_k)
    scaled = jax.lax.cond(s.top_p < 1.0, top_p_mask, lambda l, _: l, scaled, s.top_p)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

  return jax.lax.cond(s.temperature > 0, draw, lambda _: greedy, logits)
