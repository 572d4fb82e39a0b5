"""The dropless layout: every (token, choice) pair is a row, rows sorted by expert, so each
expert's rows are contiguous and a grouped matmul processes them ([T*K', d] in total).

An expert index equal to N' (the number of experts) means "no expert" (a zero-compute
expert): such a pair sorts after every expert's rows and is in no group, so the first
sum(group_sizes) sorted rows are exactly the real pairs. Every backend's grouped matmul
leaves rows past sum(group_sizes) out (they give 0), so a "no expert" pair is multiplied
by no expert's weights and contributes 0, whatever its gate.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SortedRouting(NamedTuple):
  order: jax.Array        # [T*K'] flat (token, choice) index of each sorted row
  group_sizes: jax.Array  # [N'] rows per expert, int32 ("no expert" rows: in none, last)


def sort_by_expert(expert_idx: jax.Array, n_experts: int) -> SortedRouting:
  """expert_idx: [T, K'] in [0, N'], N' = n_experts meaning "no expert" -> the permutation
  that makes each expert's rows contiguous, "no expert" rows after all of them."""
  flat = expert_idx.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  # Group N' counts the "no expert" rows and is cut off: counted explicitly rather than
  # left to what a scatter does with an index out of range.
  group_sizes = jnp.zeros((n_experts + 1,), jnp.int32).at[flat].add(1)[:n_experts]
  return SortedRouting(order, group_sizes)


def n_routed(routing: SortedRouting) -> jax.Array:
  """[] int32: the sorted rows that go to an expert (the rest are "no expert" pairs)."""
  return jnp.sum(routing.group_sizes).astype(jnp.int32)


def row_tokens_and_gates(routing: SortedRouting, gates: jax.Array) -> tuple[jax.Array, jax.Array]:
  """gates: [T, K'] -> (token of each sorted row [T*K'] int32, its gate [T*K'] f32)."""
  tok = (routing.order // gates.shape[1]).astype(jnp.int32)
  return tok, jnp.take(gates.reshape(-1), routing.order).astype(jnp.float32)


def permute(x: jax.Array, routing: SortedRouting, k: int) -> jax.Array:
  """x: [T, d] -> rows in expert order [T*K', d] (token t repeated once per choice).

  The array's shape is static, so "no expert" pairs still fill its tail with copies of
  their tokens' rows; no grouped matmul reads them."""
  return jnp.take(x, routing.order // k, axis=0)


def unpermute(y: jax.Array, routing: SortedRouting, gates: jax.Array) -> jax.Array:
  """y: [T*K', d] in expert order, gates: [T, K'] -> sum_k gate * y, [T, d].

  Uses the inverse permutation as a gather, so the backward pass is a gather too. A "no
  expert" pair reads its row past the groups, 0 by the grouped matmul's contract, so it
  adds exactly 0 (and its gate gets exactly 0 gradient).
  """
  n_tokens, k = gates.shape
  inverse = jnp.argsort(routing.order).astype(jnp.int32)
  y = jnp.take(y, inverse, axis=0).reshape(n_tokens, k, -1)
  return jnp.einsum("tkd,tk->td", y, gates.astype(y.dtype))
