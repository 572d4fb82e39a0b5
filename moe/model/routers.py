"""Routers: small functions that turn tokens' router logits (or ids) into gates and expert
choices. A new router is a function here and an entry in ROUTERS.

    topk:   DeepSeekMoE. Softmax over routed experts, top-K', raw probabilities as gates;
            dropless.
    switch: top-1, gate = its probability; capacity and token dropping.
    gshard: top-2, gates renormalised over the pair, the second expert kept in training with
            probability min(1, 2 g_2); capacity and token dropping.
    hash:   a fixed hash of the token id picks one expert, gate 1; dropless.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

import jax
import jax.numpy as jnp

from moe.model import routing

if TYPE_CHECKING:  # the config validates router names against ROUTERS
  from moe.model.config import ModelConfig


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


def route_topk(a: RouteArgs) -> Route:
  """DeepSeekMoE: softmax over routed experts, top-K', raw probabilities as gates."""
  scores = jax.nn.softmax(a.logits, axis=-1)
  gates, idx = routing.top_k(scores, a.cfg.n_activated_experts, normalize=a.cfg.norm_topk_prob)
  return Route(gates, idx, scores, a.logits)


def route_switch(a: RouteArgs) -> Route:
  """Switch Transformer: top-1, gate = its probability."""
  scores = jax.nn.softmax(a.logits, axis=-1)
  gates, idx = routing.top_k(scores, 1)
  return Route(gates, idx, scores, a.logits)


def route_gshard(a: RouteArgs) -> Route:
  """GShard: top-2 with gates renormalised over the pair; in training the second expert is
  kept with probability min(1, 2 * g_2), proportional to its gate."""
  scores = jax.nn.softmax(a.logits, axis=-1)
  gates, idx = routing.top_k(scores, 2, normalize=True)
  keep = jnp.ones_like(idx, dtype=bool)
  if a.key is not None:
    second = jax.random.uniform(a.key, gates[:, 1].shape) < 2.0 * gates[:, 1]
    keep = keep.at[:, 1].set(second)
  return Route(gates, idx, scores, a.logits, keep)


def route_hash(a: RouteArgs) -> Route:
  """Hash layer: a fixed hash of the token id picks one expert, gate 1."""
  idx = routing.hash_experts(a.token_ids, a.cfg.n_routed_experts)
  return Route(jnp.ones(idx.shape, jnp.float32), idx, None, None)


class RouterSpec(NamedTuple):
  fn: Callable[[RouteArgs], Route]
  has_weights: bool
  dropless: bool


ROUTERS: dict[str, RouterSpec] = {
    "topk": RouterSpec(route_topk, has_weights=True, dropless=True),
    "switch": RouterSpec(route_switch, has_weights=True, dropless=False),
    "gshard": RouterSpec(route_gshard, has_weights=True, dropless=False),
    "hash": RouterSpec(route_hash, has_weights=False, dropless=True),
}
