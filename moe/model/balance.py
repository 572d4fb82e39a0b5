"""Load balance: the paper's expert- and device-level balance losses, the router z-loss,
and per-layer routing statistics (expert load, router entropy, dropped pairs).

Notation follows the paper: T tokens, N' routed experts, K' routed experts per token,
s_{i,t} the softmax score of expert i for token t.

Every function takes an optional token mask [T] (bool): the real tokens of a batch with
padding (moe.model.loss.real_tokens). Masked-out tokens contribute nothing and T counts
the real tokens only, so a batch with padding gives the values of its real tokens alone.
Without a mask every token counts (a full mask gives the same values up to rounding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _per_token(mask: jax.Array, like: jax.Array) -> jax.Array:
  """mask [T] -> bool broadcastable against `like` [T, ...]."""
  return mask.astype(bool).reshape(mask.shape + (1,) * (like.ndim - 1))


def real_count(mask: jax.Array) -> jax.Array:
  """Number of real tokens of `mask` [T], at least 1 (an all-padding batch's statistics are
  0, not NaN), fp32."""
  return jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def token_mean(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean of x [T, ...] over its real tokens (all without a mask) -> [...]."""
  if mask is None:
    return jnp.mean(x, axis=0)
  kept = jnp.where(_per_token(mask, x), x, jnp.zeros((), x.dtype))
  return jnp.sum(kept, axis=0) / real_count(mask).astype(x.dtype)


def expert_counts(expert_idx: jax.Array, n_experts: int, mask: jax.Array | None = None) -> jax.Array:
  """expert_idx: [T, K'] -> number of (token, choice) pairs per expert [N'] (fp32), of the
  real tokens only with a mask [T]."""
  ones = 1.0 if mask is None else jnp.broadcast_to(
      _per_token(mask, expert_idx), expert_idx.shape).astype(jnp.float32).reshape(-1)
  # mode="drop": indices past n_experts (zero-compute experts, "no expert") are not counted.
  return jnp.zeros((n_experts,), jnp.float32).at[expert_idx.reshape(-1)].add(ones, mode="drop")


def balance_terms(scores: jax.Array, expert_idx: jax.Array,
                  mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The paper's f_i = N'/(K' T) * count_i and P_i = mean_t s_{i,t}, both [N'] (T, count
  and the mean over the real tokens with a mask [T])."""
  n_tokens, n_experts = scores.shape
  k = expert_idx.shape[-1]
  counts = expert_counts(expert_idx, n_experts, mask)
  if mask is None:
    f = counts * (n_experts / (k * n_tokens))
  else:
    f = counts * (n_experts / k) / real_count(mask)
  p = token_mean(scores.astype(jnp.float32), mask)
  return f, p


def expert_balance_loss(scores: jax.Array, expert_idx: jax.Array,
                        mask: jax.Array | None = None) -> jax.Array:
  """sum_i f_i P_i (unweighted; perfect balance gives 1). scores: [T, N'], expert_idx: [T, K']."""
  f, p = balance_terms(scores, expert_idx, mask)
  # f counts discrete choices: no gradient flows through it, only through P.
  return jnp.sum(jax.lax.stop_gradient(f) * p)


def seq_balance_loss(scores: jax.Array, expert_idx: jax.Array, n_seqs: int,
                     mask: jax.Array | None = None) -> jax.Array:
  """DeepSeek-V3's complementary sequence-wise balance loss (unweighted): the expert-level
  sum_i f_i P_i of each of the n_seqs sequences (T = n_seqs x S tokens in order), with
  scores normalised to sum 1 per token (s'), averaged over the sequences. Softmax scores
  are already normalised, so any router with scores can use it."""
  t, n = scores.shape
  s = scores.astype(jnp.float32)
  s = s / jnp.sum(s, axis=-1, keepdims=True)
  sc, ix = s.reshape(n_seqs, t // n_seqs, n), expert_idx.reshape(n_seqs, t // n_seqs, -1)
  if mask is None:
    return jnp.mean(jax.vmap(expert_balance_loss)(sc, ix))
  m = mask.reshape(n_seqs, t // n_seqs)
  losses = jax.vmap(expert_balance_loss)(sc, ix, m)
  has_real = jnp.any(m, axis=-1)  # a sequence of padding only does not count
  return jnp.sum(jnp.where(has_real, losses, 0.0)) / jnp.maximum(jnp.sum(has_real), 1)


def device_balance_loss(scores: jax.Array, expert_idx: jax.Array, n_groups: int,
                        mask: jax.Array | None = None) -> jax.Array:
  """sum_d f'_d P'_d over n_groups equal groups of consecutive experts (unweighted).

  f'_d is the mean of f over group d, P'_d the sum of P over it. With one expert per group
  this is the expert-level loss.
  """
  f, p = balance_terms(scores, expert_idx, mask)
  f_dev = jnp.mean(f.reshape(n_groups, -1), axis=1)
  p_dev = jnp.sum(p.reshape(n_groups, -1), axis=1)
  return jnp.sum(jax.lax.stop_gradient(f_dev) * p_dev)


def z_loss(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Router z-loss (ST-MoE): mean_t logsumexp(logits_t)^2."""
  return token_mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2, mask)


def routing_stats(expert_idx: jax.Array, n_experts: int, n_dropped: jax.Array,
                  scores: jax.Array | None = None,
                  mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-layer statistics. `load` is each expert's fraction of the T*K' assignments;
  the router entropy is 0 for routers without scores (hash). With a mask [T], of the real
  tokens only: then `n_dropped` counts the real tokens' dropped pairs."""
  counts = expert_counts(expert_idx, n_experts, mask)
  load = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = jnp.zeros((), jnp.float32)
  if scores is not None:
    p = scores.astype(jnp.float32)
    entropy = -token_mean(jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1), mask)
  return {
      "load": load,
      "max_over_mean_load": jnp.max(load) * n_experts,
      "router_entropy": entropy,
      "dropped_fraction": dropped_fraction(n_dropped, expert_idx, mask),
  }


def dropped_fraction(n_dropped: jax.Array, expert_idx: jax.Array,
                     mask: jax.Array | None = None) -> jax.Array:
  """Dropped (token, choice) pairs over all pairs of expert_idx [T, K'] (the real tokens')."""
  pairs = expert_idx.size if mask is None else expert_idx.shape[-1] * real_count(mask)
  return jnp.asarray(n_dropped, jnp.float32) / pairs
