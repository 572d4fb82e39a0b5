"""Dispatch: moving tokens to experts and back.

Two layouts:
- dropless, sort-based: every (token, choice) pair is a row, rows sorted by expert, so each
  expert's rows are contiguous and a grouped matmul processes them ([T*K', d] in total);
- capacity: each expert gets a fixed [C, d] buffer, pairs past C are dropped (Switch, GShard).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class SortedRouting(NamedTuple):
  order: jax.Array        # [T*K'] flat (token, choice) index of each sorted row
  group_sizes: jax.Array  # [N'] rows per expert, int32


def sort_by_expert(expert_idx: jax.Array, n_experts: int) -> SortedRouting:
  """expert_idx: [T, K'] -> the permutation that makes each expert's rows contiguous."""
  flat = expert_idx.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  group_sizes = jnp.zeros((n_experts,), jnp.int32).at[flat].add(1)
  return SortedRouting(order, group_sizes)


def permute(x: jax.Array, routing: SortedRouting, k: int) -> jax.Array:
  """x: [T, d] -> rows in expert order [T*K', d] (token t repeated once per choice)."""
  return jnp.take(x, routing.order // k, axis=0)


def unpermute(y: jax.Array, routing: SortedRouting, gates: jax.Array) -> jax.Array:
  """y: [T*K', d] in expert order, gates: [T, K'] -> sum_k gate * y, [T, d].

  Uses the inverse permutation as a gather, so the backward pass is a gather too.
  """
  n_tokens, k = gates.shape
  inverse = jnp.argsort(routing.order).astype(jnp.int32)
  y = jnp.take(y, inverse, axis=0).reshape(n_tokens, k, -1)
  return jnp.einsum("tkd,tk->td", y, gates.astype(y.dtype))


# ---------------------------------------------------------------------------------------
# Capacity layout.

def capacity(n_tokens: int, n_experts: int, k: int, capacity_factor: float) -> int:
  """Slots per expert: ceil(capacity_factor * K' * T / N')."""
  return max(1, math.ceil(capacity_factor * k * n_tokens / n_experts))


class CapacityRouting(NamedTuple):
  dispatch: jax.Array   # [T, N', C] one-hot: token t fills slot c of expert e
  combine: jax.Array    # [T, N', C] dispatch * gate
  n_dropped: jax.Array  # scalar: (token, choice) pairs that found their expert full


def assign_slots(expert_idx: jax.Array, gates: jax.Array, n_experts: int, cap: int,
                 keep: jax.Array | None = None) -> CapacityRouting:
  """expert_idx, gates: [T, K']; keep: optional [T, K'] bool of pairs to route at all.

  Slots are filled in GShard's priority order: every token's first choice before any
  second choice, tokens in sequence order within a choice.
  """
  n_tokens, k = expert_idx.shape
  if keep is None:
    keep = jnp.ones_like(expert_idx, dtype=bool)
  onehot = jax.nn.one_hot(expert_idx, n_experts, dtype=jnp.int32) * keep[..., None]  # [T, K', N']
  by_priority = jnp.swapaxes(onehot, 0, 1).reshape(k * n_tokens, n_experts)       # choice-major
  position = (jnp.cumsum(by_priority, axis=0) - 1) * by_priority                   # slot per pair
  fits = by_priority * (position < cap)
  n_dropped = jnp.sum(by_priority) - jnp.sum(fits)
  slot = jax.nn.one_hot(position, cap, dtype=jnp.float32) * fits[..., None]        # [K'T, N', C]
  slot = jnp.swapaxes(slot.reshape(k, n_tokens, n_experts, cap), 0, 1)             # [T, K', N', C]
  dispatch = jnp.sum(slot, axis=1)
  combine = jnp.einsum("tkec,tk->tec", slot, gates.astype(jnp.float32))
  return CapacityRouting(dispatch, combine, n_dropped)


def to_slots(x: jax.Array, routing: CapacityRouting) -> jax.Array:
  """x: [T, d] -> expert buffers [N', C, d] (empty slots are zero)."""
  return jnp.einsum("tec,td->ecd", routing.dispatch.astype(x.dtype), x)


def from_slots(y: jax.Array, routing: CapacityRouting) -> jax.Array:
  """y: [N', C, d] -> gate-weighted sum per token [T, d]."""
  return jnp.einsum("tec,ecd->td", routing.combine.astype(y.dtype), y)
