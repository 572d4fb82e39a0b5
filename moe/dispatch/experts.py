"""Experts: SwiGLU FFNs over stacked expert weights, applied to grouped or slotted rows.

A grouped matmul `gmm(lhs [m, k], rhs [G, k, n], group_sizes [G]) -> [m, n]` multiplies
each contiguous block of rows by its group's matrix (rows past sum(group_sizes) give 0);
moe.dispatch.registry names the implementations.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """x: [..., d] with w_gate, w_up: [d, f] and w_down: [f, d] -> [..., d]."""
  return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def grouped_swiglu(x: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, gmm: GroupedMatmul) -> jax.Array:
  """x: [m, d] sorted by expert; w_gate, w_up: [E, d, f]; w_down: [E, f, d] -> [m, d]."""
  with jax.named_scope("routed_experts"):  # plans attribute compiled time by scope
    h = jax.nn.silu(gmm(x, w_gate, group_sizes)) * gmm(x, w_up, group_sizes)
    return gmm(h, w_down, group_sizes)


def slotted_swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """x: [E, C, d] capacity buffers -> [E, C, d], expert e applied to buffer e."""
  with jax.named_scope("routed_experts"):
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x, w_gate)) * jnp.einsum("ecd,edf->ecf", x, w_up)
    return jnp.einsum("ecf,efd->ecd", h, w_down)
