"""The MoE FFN: shared experts, a router, routed experts, and the dispatch between them.

    y = shared(x) + sum over chosen experts i of g_i * expert_i(x)

Routers are small functions in ROUTERS that turn a token's hidden state (and id) into
gates and expert choices; the layer then dispatches dropless (sort + grouped matmul) or
with capacity (Switch, GShard), as the router asks.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe import backends, dispatch, experts, routing, sharding
from moe.expert_parallel import expert_parallel_moe
from moe.config import ModelConfig
from moe.layers import SwiGLU, param
from moe.trace_setting import TraceSetting


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


class RoutedExperts(nnx.Module):
  """N' SwiGLU experts with stacked weights: w_gate, w_up [N', d, f], w_down [N', f, d]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    e, d, f = cfg.n_routed_experts, cfg.d_model, cfg.expert_width
    self.w_gate = param(rngs, cfg, (e, d, f), ("expert", "embed", "expert_mlp"))
    self.w_up = param(rngs, cfg, (e, d, f), ("expert", "embed", "expert_mlp"))
    self.w_down = param(rngs, cfg, (e, f, d), ("expert", "expert_mlp", "embed"))

  def weights(self, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    return tuple(w[...].astype(dtype) for w in (self.w_gate, self.w_up, self.w_down))


def dropless_moe(x: jax.Array, route: Route, weights, backend: backends.Backend) -> tuple[jax.Array, jax.Array]:
  """x: [T, d] -> (sum_k g_k expert_k(x) [T, d], number of dropped pairs = 0)."""
  sorted_routing = dispatch.sort_by_expert(route.expert_idx, weights[0].shape[0])
  return backend.experts(x, sorted_routing, route.gates, weights), jnp.zeros((), jnp.int32)


def capacity_moe(x: jax.Array, route: Route, weights, capacity_factor: float) -> tuple[jax.Array, jax.Array]:
  """x: [T, d] -> (gate-weighted expert outputs [T, d], dropped pairs), fixed-size buffers."""
  n_experts = weights[0].shape[0]
  n_tokens, k = route.expert_idx.shape
  cap = dispatch.capacity(n_tokens, n_experts, k, capacity_factor)
  slots = dispatch.assign_slots(route.expert_idx, n_experts, cap, route.keep)
  out = experts.slotted_swiglu(dispatch.to_slots(x, slots, n_experts), *weights)
  return dispatch.from_slots(out, slots, route.gates), slots.n_dropped


# ---------------------------------------------------------------------------------------
# Evaluation-time interventions (the paper's analyses), read when the model is traced.

class Intervention(NamedTuple):
  mask_top: int = 0                # disable each token's this many highest-scoring routed experts
  n_activated: int | None = None   # route each token to this many experts (None: the config's K')
  drop_shared: bool = False        # switch the shared experts off
  capture: bool = False            # add each token's chosen experts to aux ('expert_idx' [T, K'])
  capacity_factor: float | None = None  # capacity routers: this factor instead of the config's


_INTERVENTION: TraceSetting[Intervention] = TraceSetting(Intervention())


def intervene(intervention: Intervention):
  """Trace the model with this intervention (jit a fresh function inside the block)."""
  return _INTERVENTION.use(intervention)


def rerouted(cfg: ModelConfig, route: Route, iv: Intervention) -> Route:
  """Top-K from the scores once each token's `mask_top` best experts are ruled out; gates
  stay the original probabilities (renormalised only where the router renormalises)."""
  if route.scores is None:
    raise ValueError(f"router {cfg.router!r} has no scores to re-route by")
  k = iv.n_activated or route.expert_idx.shape[-1]
  scores = route.scores
  if iv.mask_top:
    _, top = jax.lax.top_k(scores, iv.mask_top)
    ruled_out = jnp.zeros_like(scores, dtype=bool).at[jnp.arange(scores.shape[0])[:, None], top].set(True)
    scores = jnp.where(ruled_out, -1.0, scores)  # probabilities are >= 0
  normalize = cfg.norm_topk_prob or cfg.router == "gshard"
  gates, idx = routing.top_k(scores, k, normalize=normalize)
  return Route(gates, idx, route.scores, route.logits)


class MoE(nnx.Module):
  """DeepSeekMoE FFN (and, with another router, the paper's Switch/GShard/Hash baselines)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    # K_s shared experts fused into one always-on SwiGLU of width K_s * expert_width.
    self.shared = (SwiGLU(cfg, cfg.n_shared_experts * cfg.expert_width, rngs)
                   if cfg.n_shared_experts else None)
    self.router = (param(rngs, cfg, (cfg.d_model, cfg.n_routed_experts), ("embed", "expert"))
                   if ROUTERS[cfg.router].has_weights else None)
    self.experts = RoutedExperts(cfg, rngs)

  def __call__(self, x: jax.Array, token_ids: jax.Array, key: jax.Array | None = None):
    """x: [T, d_model], token_ids: [T] -> (y [T, d_model], aux: losses and routing stats).

    `key` enables stochastic routing (GShard's second expert) during training.
    """
    cfg = self.cfg
    spec = ROUTERS[cfg.router]
    logits = routing.router_logits(x, self.router[...]) if self.router is not None else None
    route = spec.fn(RouteArgs(cfg, logits, token_ids, key))
    iv = _INTERVENTION.value
    if iv.mask_top or iv.n_activated:
      route = rerouted(cfg, route, iv)
    weights = self.experts.weights(x.dtype)
    mesh = sharding.active_mesh()
    if spec.dropless and mesh is not None:
      y, n_dropped = expert_parallel_moe(x, route.gates, route.expert_idx, weights,
                                         backends.resolve(cfg.dispatch), mesh,
                                         cfg.expert_capacity_factor)
    elif spec.dropless:
      y, n_dropped = dropless_moe(x, route, weights, backends.resolve(cfg.dispatch))
    else:  # capacity routers keep global (single-device) semantics; XLA partitions them
      y, n_dropped = capacity_moe(x, route, weights, iv.capacity_factor or cfg.capacity_factor)
    if self.shared is not None and not iv.drop_shared:
      y = y + self.shared(x)
    aux = moe_aux(cfg, route, n_dropped)
    if iv.capture:
      aux["expert_idx"] = route.expert_idx
    return y, aux


def moe_aux(cfg: ModelConfig, route: Route, n_dropped: jax.Array) -> dict[str, jax.Array]:
  """Unweighted auxiliary losses and routing statistics of one layer."""
  zero = jnp.zeros((), jnp.float32)
  aux = {"expert_balance_loss": zero, "device_balance_loss": zero, "z_loss": zero}
  if route.scores is not None:
    aux["expert_balance_loss"] = routing.expert_balance_loss(route.scores, route.expert_idx)
    # Default groups: the expert-parallel shards of the active mesh (1 without one).
    groups = cfg.n_device_groups or sharding.axis_size(sharding.active_mesh(), "expert")
    aux["device_balance_loss"] = routing.device_balance_loss(route.scores, route.expert_idx, groups)
    aux["z_loss"] = routing.z_loss(route.logits)
  aux.update(routing.routing_stats(route.expert_idx, cfg.n_routed_experts, n_dropped, route.scores))
  return aux


AUX_LOSS_WEIGHTS = {
    "expert_balance_loss": "expert_balance_alpha",
    "device_balance_loss": "device_balance_alpha",
    "z_loss": "router_z_loss_alpha",
}
