"""The capacity layout (Switch, GShard, and expert parallelism's send buffers): each
expert gets a fixed [C, d] buffer, pairs past C are dropped; tokens move into and out of
the buffers by index gathers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


def slots_per_expert(n_tokens: int, n_experts: int, k: int, capacity_factor: float) -> int:
  """Slots per expert: ceil(capacity_factor * K' * T / N')."""
  return max(1, math.ceil(capacity_factor * k * n_tokens / n_experts))


class CapacityRouting(NamedTuple):
  slot_token: jax.Array  # [N'*C] token filling each slot, T for an empty slot
  pair_slot: jax.Array   # [T, K'] slot of each (token, choice) pair, N'*C if not dispatched
  n_dropped: jax.Array   # scalar: (token, choice) pairs that found their expert full


def assign_slots(expert_idx: jax.Array, n_experts: int, cap: int,
                 keep: jax.Array | None = None,
                 token_mask: jax.Array | None = None) -> CapacityRouting:
  """expert_idx: [T, K'] in [0, N'], N' = n_experts meaning "no expert"; keep: optional
  [T, K'] bool of pairs to route at all; token_mask: optional [T] bool of the tokens whose
  dropped pairs n_dropped counts (the real tokens of a batch with padding; the slots are
  filled as without it). A "no expert" pair is routed nowhere, like one not kept: it takes
  no slot and is not counted as dropped.

  Slots are filled in GShard's priority order: every token's first choice before any
  second choice, tokens in sequence order within a choice. Only index arrays are built
  (no [T, N', C] one-hot tensors), so memory stays O(T K' + N' C).
  """
  n_tokens, k = expert_idx.shape
  if keep is None:
    keep = jnp.ones_like(expert_idx, dtype=bool)
  experts = jnp.swapaxes(expert_idx, 0, 1).reshape(-1)                     # [K'T], choice-major
  wanted = jnp.swapaxes(keep, 0, 1).reshape(-1) & (experts < n_experts)
  onehot = jax.nn.one_hot(experts, n_experts, dtype=jnp.int32) * wanted[:, None]
  position = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)   # rank within expert
  fits = wanted & (position < cap)
  empty = n_experts * cap
  slot = jnp.where(fits, experts * cap + position, empty)
  token = jnp.tile(jnp.arange(n_tokens, dtype=jnp.int32), k)
  slot_token = jnp.full((empty + 1,), n_tokens, jnp.int32).at[slot].set(token)[:empty]
  pair_slot = slot.reshape(k, n_tokens).T.astype(jnp.int32)
  if token_mask is None:
    n_dropped = jnp.sum(wanted) - jnp.sum(fits)
  else:
    counted = jnp.tile(token_mask.astype(bool), k)
    n_dropped = jnp.sum(wanted & ~fits & counted).astype(jnp.int32)
  return CapacityRouting(slot_token, pair_slot, n_dropped)


def _rows_or_zero(a: jax.Array, idx: jax.Array) -> jax.Array:
  """a: [R, d] -> a[idx], where idx == R (the sentinel for "none") gives a zero row."""
  a = jnp.concatenate([a, jnp.zeros((1, a.shape[1]), a.dtype)])
  return jnp.take(a, idx, axis=0)


def to_slots(x: jax.Array, routing: CapacityRouting, n_experts: int) -> jax.Array:
  """x: [T, d] -> expert buffers [N', C, d] (empty slots are zero)."""
  return _rows_or_zero(x, routing.slot_token).reshape(n_experts, -1, x.shape[1])


def from_slots(y: jax.Array, routing: CapacityRouting, gates: jax.Array) -> jax.Array:
  """y: [N', C, d], gates: [T, K'] -> sum of each token's kept choices' gate * output, [T, d]."""
  rows = _rows_or_zero(y.reshape(-1, y.shape[-1]), routing.pair_slot)      # [T, K', d]
  return jnp.einsum("tkd,tk->td", rows, gates.astype(y.dtype))
