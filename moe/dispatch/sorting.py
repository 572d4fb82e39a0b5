"""The dropless layout: every (token, choice) pair is a row, rows sorted by expert, so each
expert's rows are contiguous and a grouped matmul processes them ([T*K', d] in total).
"""

from __future__ import annotations

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


def row_tokens_and_gates(routing: SortedRouting, gates: jax.Array) -> tuple[jax.Array, jax.Array]:
  """gates: [T, K'] -> (token of each sorted row [T*K'] int32, its gate [T*K'] f32)."""
  tok = (routing.order // gates.shape[1]).astype(jnp.int32)
  return tok, jnp.take(gates.reshape(-1), routing.order).astype(jnp.float32)


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
