"""Load balance: the paper's expert- and device-level balance losses, the router z-loss,
and per-layer routing statistics (expert load, router entropy, dropped pairs).

Notation follows the paper: T tokens, N' routed experts, K' routed experts per token,
s_{i,t} the softmax score of expert i for token t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def expert_counts(expert_idx: jax.Array, n_experts: int) -> jax.Array:
  """expert_idx: [T, K'] -> number of (token, choice) pairs per expert [N'] (fp32)."""
  return jnp.zeros((n_experts,), jnp.float32).at[expert_idx.reshape(-1)].add(1.0)


def balance_terms(scores: jax.Array, expert_idx: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The paper's f_i = N'/(K' T) * count_i and P_i = mean_t s_{i,t}, both [N']."""
  n_tokens, n_experts = scores.shape
  k = expert_idx.shape[-1]
  f = expert_counts(expert_idx, n_experts) * (n_experts / (k * n_tokens))
  p = jnp.mean(scores.astype(jnp.float32), axis=0)
  return f, p


def expert_balance_loss(scores: jax.Array, expert_idx: jax.Array) -> jax.Array:
  """sum_i f_i P_i (unweighted; perfect balance gives 1). scores: [T, N'], expert_idx: [T, K']."""
  f, p = balance_terms(scores, expert_idx)
  # f counts discrete choices: no gradient flows through it, only through P.
  return jnp.sum(jax.lax.stop_gradient(f) * p)


def device_balance_loss(scores: jax.Array, expert_idx: jax.Array, n_groups: int) -> jax.Array:
  """sum_d f'_d P'_d over n_groups equal groups of consecutive experts (unweighted).

  f'_d is the mean of f over group d, P'_d the sum of P over it. With one expert per group
  this is the expert-level loss.
  """
  f, p = balance_terms(scores, expert_idx)
  f_dev = jnp.mean(f.reshape(n_groups, -1), axis=1)
  p_dev = jnp.sum(p.reshape(n_groups, -1), axis=1)
  return jnp.sum(jax.lax.stop_gradient(f_dev) * p_dev)


def z_loss(logits: jax.Array) -> jax.Array:
  """Router z-loss (ST-MoE): mean_t logsumexp(logits_t)^2."""
  return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2)


def routing_stats(expert_idx: jax.Array, n_experts: int, n_dropped: jax.Array,
                  scores: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-layer statistics. `load` is each expert's fraction of the T*K' assignments;
  the router entropy is 0 for routers without scores (hash)."""
  counts = expert_counts(expert_idx, n_experts)
  load = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = jnp.zeros((), jnp.float32)
  if scores is not None:
    p = scores.astype(jnp.float32)
    entropy = -jnp.mean(jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1))
  return {
      "load": load,
      "max_over_mean_load": jnp.max(load) * n_experts,
      "router_entropy": entropy,
      "dropped_fraction": jnp.asarray(n_dropped, jnp.float32) / expert_idx.size,
  }
