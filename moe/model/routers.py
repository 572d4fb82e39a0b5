"""Routers: small functions that turn tokens' router logits (or ids) into gates and expert
choices, and the pieces they share (router logits, top-k, the token-id hash). A new router
is a function here and an entry in ROUTERS. Notation follows the paper: T tokens, N'
routed experts, K' routed experts per token, s_{i,t} the softmax score of expert i for t.

    topk:   DeepSeekMoE. Softmax over routed experts, top-K', raw probabilities as gates;
            dropless.
    topk_bias: as topk, but a per-expert bias b_i (not trained; moved after each step by
            -+bias_update_rate from the sign of the expert's load error, Transformer.
            update_score_bias) is added to the logits for choosing the top-K' only (s_i scaled by e^{b_i}); gates
            stay the unbiased probabilities (DeepSeek-V3's auxiliary-loss-free balancing).
    switch: top-1, gate = its probability; capacity and token dropping (capacity_factor 0:
            no dropping, the dropless path with the same gates).
    gshard: top-2, gates renormalised over the pair, the second expert kept in training with
            probability min(1, 2 g_2); capacity and token dropping (or none, as switch).
    hash:   a fixed hash of the token id picks one expert, gate 1; dropless.
    group_limited: DeepSeek-V2's device-limited routing. Softmax scores; the N' experts form
            G groups; a token keeps the topk_group groups with the highest maximum score and
            takes its top-K' inside them; raw gates x routed_scaling_factor; dropless.
    sigmoid_bias: DeepSeek-V3 (noaux_tc). Sigmoid scores; the topk_bias selection bias is added
            for choosing only; groups ranked by the sum of their two best biased scores,
            topk_group kept, top-K' inside; gates are the unbiased scores of the choices
            (normalised to sum 1 with norm_topk_prob) x routed_scaling_factor; dropless.

The top-k family (topk, topk_bias, group_limited, sigmoid_bias) multiplies its gates by
routed_scaling_factor; topk and topk_bias also route to zero-compute experts (indices N' and
up, when n_null_experts > 0: the layer sends those pairs nowhere).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # the config validates router names against ROUTERS
  from moe.model.config import ModelConfig


def router_logits(x: jax.Array, w_router: jax.Array) -> jax.Array:
  """x: [T, d_model], w_router: [d_model, N'] -> logits [T, N'] in fp32 (as the HF code)."""
  return jnp.dot(x.astype(jnp.float32), w_router.astype(jnp.float32))


def top_k(scores: jax.Array, k: int, normalize: bool = False) -> tuple[jax.Array, jax.Array]:
  """scores: [T, N'] -> (gates [T, k], expert_idx [T, k] int32), highest score first.

  The gates are the raw scores (DeepSeekMoE); `normalize` rescales them to sum to one.
  """
  gates, idx = jax.lax.top_k(scores, k)
  if normalize:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  return gates, idx.astype(jnp.int32)


def hash_experts(token_ids: jax.Array, n_experts: int) -> jax.Array:
  """token_ids: [T] -> expert index [T, 1]: a fixed multiplicative hash of the token id."""
  h = token_ids.astype(jnp.uint32) * jnp.uint32(2654435761)  # Knuth's constant
  return ((h >> 16) % jnp.uint32(n_experts)).astype(jnp.int32)[:, None]


class Route(NamedTuple):
  gates: jax.Array               # [T, K'] weight of each choice
  expert_idx: jax.Array          # [T, K'] int32
  scores: jax.Array | None       # [T, N'] router softmax, None for routers without one
  logits: jax.Array | None       # [T, N'] fp32 router logits
  keep: jax.Array | None = None  # [T, K'] bool: choices actually dispatched (GShard)


class RouteArgs(NamedTuple):
  cfg: ModelConfig
  logits: jax.Array | None  # [T, N'] fp32, None for routers without weights
  token_ids: jax.Array      # [T]
  key: jax.Array | None     # randomness for stochastic routers; None = deterministic
  score_bias: jax.Array | None = None  # [N'] selection-only bias (topk_bias, sigmoid_bias)
  n_group: int = 1          # expert groups of group-limited routers, resolved by the layer


def route_topk(a: RouteArgs) -> Route:
  """DeepSeekMoE: softmax over routed experts, top-K', raw probabilities as gates."""
  scores = jax.nn.softmax(a.logits, axis=-1)
  gates, idx = top_k(scores, a.cfg.n_activated_experts, normalize=a.cfg.norm_topk_prob)
  return Route(gates * a.cfg.routed_scaling_factor, idx, scores, a.logits)


def route_topk_bias(a: RouteArgs) -> Route:
  """Auxiliary-loss-free balancing: top-K' of logits + bias, gates = the unbiased scores."""
  scores = jax.nn.softmax(a.logits, axis=-1)
  # On the logits: a bias b_i scales s_i by e^{b_i}, the same step for any N' and score size.
  _, idx = jax.lax.top_k(a.logits + a.score_bias.astype(a.logits.dtype), a.cfg.n_activated_experts)
  gates = jnp.take_along_axis(scores, idx, axis=-1)
  if a.cfg.norm_topk_prob:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  return Route(gates * a.cfg.routed_scaling_factor, idx.astype(jnp.int32), scores, a.logits)


def route_switch(a: RouteArgs) -> Route:
  """Switch Transformer: top-1, gate = its probability."""
  scores = jax.nn.softmax(a.logits, axis=-1)
  gates, idx = top_k(scores, 1)
  return Route(gates, idx, scores, a.logits)


def route_gshard(a: RouteArgs) -> Route:
  """GShard: top-2 with gates renormalised over the pair; in training the second expert is
  kept with probability min(1, 2 * g_2), proportional to its gate."""
  scores = jax.nn.softmax(a.logits, axis=-1)
  gates, idx = top_k(scores, 2, normalize=True)
  keep = jnp.ones_like(idx, dtype=bool)
  if a.key is not None:
    second = jax.random.uniform(a.key, gates[:, 1].shape) < 2.0 * gates[:, 1]
    keep = keep.at[:, 1].set(second)
  return Route(gates, idx, scores, a.logits, keep)


def route_hash(a: RouteArgs) -> Route:
  """Hash layer: a fixed hash of the token id picks one expert, gate 1."""
  idx = hash_experts(a.token_ids, a.cfg.n_routed_experts)
  return Route(jnp.ones(idx.shape, jnp.float32), idx, None, None)


def group_mask(choice: jax.Array, n_group: int, topk_group: int, group_score) -> jax.Array:
  """choice: [T, N'] -> bool [T, N']: the experts of each token's topk_group best groups
  (G = n_group groups of consecutive experts), groups scored by group_score([T, G, N'/G]
  -> [T, G])."""
  t, n = choice.shape
  per_group = group_score(choice.reshape(t, n_group, n // n_group))          # [T, G]
  _, best = jax.lax.top_k(per_group, topk_group)                              # [T, topk_group]
  kept = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], best].set(True)
  return jnp.repeat(kept, n // n_group, axis=1)


def route_group_limited(a: RouteArgs) -> Route:
  """DeepSeek-V2: top-K' inside the topk_group groups of highest maximum score."""
  scores = jax.nn.softmax(a.logits, axis=-1)
  keep = group_mask(scores, a.n_group, a.cfg.topk_group, lambda g: jnp.max(g, axis=-1))
  # Softmax scores are positive, so 0 outside the kept groups never wins a place.
  gates, idx = top_k(jnp.where(keep, scores, 0.0), a.cfg.n_activated_experts,
                     normalize=a.cfg.norm_topk_prob)
  return Route(gates * a.cfg.routed_scaling_factor, idx, scores, a.logits)


def route_sigmoid_bias(a: RouteArgs) -> Route:
  """DeepSeek-V3 (noaux_tc): sigmoid scores, choice by scores + bias inside the topk_group
  groups of highest top-2 sum, gates = the chosen unbiased scores.

  Route.scores are the sigmoid scores normalised to sum 1 per token (V3's s'), so the
  balance losses and router entropy read them as a distribution."""
  sig = jax.nn.sigmoid(a.logits)
  choice = sig + a.score_bias.astype(sig.dtype)
  keep = group_mask(choice, a.n_group, a.cfg.topk_group,
                    lambda g: jnp.sum(jax.lax.top_k(g, min(2, g.shape[-1]))[0], axis=-1))
  _, idx = jax.lax.top_k(jnp.where(keep, choice, -jnp.inf), a.cfg.n_activated_experts)
  gates = jnp.take_along_axis(sig, idx, axis=-1)
  if a.cfg.norm_topk_prob:
    gates = gates / (jnp.sum(gates, axis=-1, keepdims=True) + 1e-20)
  scores = sig / jnp.sum(sig, axis=-1, keepdims=True)
  return Route(gates * a.cfg.routed_scaling_factor, idx.astype(jnp.int32), scores, a.logits)


class RouterSpec(NamedTuple):
  fn: Callable[[RouteArgs], Route]
  has_weights: bool        # a [d_model, N'] router matrix
  dropless: bool           # False: capacity buffers, pairs past capacity dropped
  fixed_k: int | None      # the only K' the router supports (None: the config's)
  score_bias: bool = False  # a per-expert selection bias, updated outside the gradient
  scaled: bool = False      # gates x routed_scaling_factor
  grouped: bool = False     # group-limited: n_group, topk_group
  null_experts: bool = False  # may route to zero-compute experts (n_null_experts)


ROUTERS: dict[str, RouterSpec] = {
    "topk": RouterSpec(route_topk, has_weights=True, dropless=True, fixed_k=None, scaled=True,
                       null_experts=True),
    "topk_bias": RouterSpec(route_topk_bias, has_weights=True, dropless=True, fixed_k=None,
                            score_bias=True, scaled=True, null_experts=True),
    "group_limited": RouterSpec(route_group_limited, has_weights=True, dropless=True,
                                fixed_k=None, scaled=True, grouped=True),
    "sigmoid_bias": RouterSpec(route_sigmoid_bias, has_weights=True, dropless=True, fixed_k=None,
                               score_bias=True, scaled=True, grouped=True),
    "switch": RouterSpec(route_switch, has_weights=True, dropless=False, fixed_k=1),
    "gshard": RouterSpec(route_gshard, has_weights=True, dropless=False, fixed_k=2),
    "hash": RouterSpec(route_hash, has_weights=False, dropless=True, fixed_k=1),
}
