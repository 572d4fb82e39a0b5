"""The MoE FFN: shared experts, a router, routed experts, and the dispatch between them.

    y = shared(x) + sum over chosen experts i of g_i * expert_i(x)

The router (moe.model.routers) gives gates and expert choices; the layer then dispatches
dropless (sort + grouped matmul, by the configured backend; expert parallelism when a mesh
is active) or with capacity (Switch, GShard), as the router asks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.dispatch import capacity, registry
from moe.dispatch.backend import Backend
from moe.dispatch.experts import slotted_swiglu
from moe.model import balance, intervention, routers
from moe.model.config import ModelConfig
from moe.model.layers import SwiGLU, param
from moe.model.routers import ROUTERS, Route, RouteArgs
from moe.parallel import mesh as meshes
from moe.parallel.expert_parallel import expert_parallel_moe, layer_capacity_factor


class RoutedExperts(nnx.Module):
  """N' SwiGLU experts with stacked weights: w_gate, w_up [N', d, f], w_down [N', f, d]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    e, d, f = cfg.n_routed_experts, cfg.d_model, cfg.expert_width
    self.w_gate = param(rngs, cfg, (e, d, f), ("expert", "embed", "expert_mlp"))
    self.w_up = param(rngs, cfg, (e, d, f), ("expert", "embed", "expert_mlp"))
    self.w_down = param(rngs, cfg, (e, f, d), ("expert", "expert_mlp", "embed"))

  def weights(self, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    return tuple(w[...].astype(dtype) for w in (self.w_gate, self.w_up, self.w_down))


def dropless_moe(x: jax.Array, route: Route, weights, backend: Backend) -> tuple[jax.Array, jax.Array]:
  """x: [T, d] -> (sum_k g_k expert_k(x) [T, d], number of dropped pairs = 0)."""
  return backend.routed(x, route.expert_idx, route.gates, weights), jnp.zeros((), jnp.int32)


def capacity_moe(x: jax.Array, route: Route, weights, capacity_factor: float,
                 token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """x: [T, d] -> (gate-weighted expert outputs [T, d], dropped pairs), fixed-size buffers.
  token_mask: optional [T] bool, the tokens whose dropped pairs are counted."""
  n_experts = weights[0].shape[0]
  n_tokens, k = route.expert_idx.shape
  cap = capacity.slots_per_expert(n_tokens, n_experts, k, capacity_factor)
  slots = capacity.assign_slots(route.expert_idx, n_experts, cap, route.keep, token_mask)
  out = slotted_swiglu(capacity.to_slots(x, slots, n_experts), *weights)
  return capacity.from_slots(out, slots, route.gates), slots.n_dropped


class ScoreBias(nnx.Variable):
  """Per-expert selection bias of router topk_bias [N']: not a Param, so neither the
  gradient nor the optimizer sees it; Transformer.update_score_bias moves it."""


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
    self.score_bias = (ScoreBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32))
                       if ROUTERS[cfg.router].score_bias else None)

  def __call__(self, x: jax.Array, token_ids: jax.Array, key: jax.Array | None = None,
               token_mask: jax.Array | None = None):
    """x: [T, d_model], token_ids: [T] -> (y [T, d_model], aux: losses and routing stats).

    `key` enables stochastic routing (GShard's second expert) during training.
    `token_mask` [T] bool: the real tokens of a batch with padding; the losses and routing
    statistics are theirs alone (moe.model.balance). Every token is still routed and
    dispatched: y does not depend on the mask.
    """
    cfg = self.cfg
    spec = ROUTERS[cfg.router]
    bias = self.score_bias[...] if self.score_bias is not None else None
    iv = intervention.current()
    with jax.named_scope("router"):  # scopes name the parts of a compiled step (moe.train.plan)
      logits = routers.router_logits(x, self.router[...]) if self.router is not None else None
      route = spec.fn(RouteArgs(cfg, logits, token_ids, key, bias))
      if iv.mask_top or iv.n_activated:
        route = intervention.rerouted(cfg, route, iv)
    weights = self.experts.weights(x.dtype)
    mesh = meshes.active_mesh()
    cap = cfg.capacity_factor if iv.capacity_factor is None else iv.capacity_factor
    dropless = spec.dropless or cap <= 0  # capacity 0: Switch/GShard without dropping
    if route.keep is not None and dropless:
      route = route._replace(gates=jnp.where(route.keep, route.gates, 0.0))  # GShard's unkept 2nd
    with jax.named_scope("dispatch"):  # the expert matmuls inside: "routed_experts"
      if dropless and mesh is not None:
        backend = registry.resolve(cfg.dispatch_backend, meshes.target_platform(mesh))
        ep = expert_parallel_moe(x, route.gates, route.expert_idx, weights, backend, mesh,
                                 layer_capacity_factor(cfg.expert_capacity_factor, mesh),
                                 cfg.expert_block_factor, cfg.expert_exchange, token_mask)
        y, n_dropped = ep.y, ep.n_dropped
        ep_stats = {"ep_rounds": ep.rounds, "ep_max_block_load": ep.max_block_load,
                    "ep_rows_per_pair": ep.rows_per_pair}
      elif dropless:
        y, n_dropped = dropless_moe(x, route, weights, registry.resolve(cfg.dispatch_backend))
      else:  # capacity routers keep global (single-device) semantics; XLA partitions them
        y, n_dropped = capacity_moe(x, route, weights, cap, token_mask)
    if self.shared is not None and not iv.drop_shared:
      with jax.named_scope("shared_experts"):
        y = y + self.shared(x)
    aux = moe_aux(cfg, route, n_dropped, token_mask)
    if dropless and mesh is not None:
      aux.update(ep_stats)  # rounds and loads of expert parallelism, per layer
    if bias is not None:
      aux["score_bias"] = bias
    if iv.capture:
      aux["expert_idx"] = route.expert_idx
    return y, aux


def moe_aux(cfg: ModelConfig, route: Route, n_dropped: jax.Array,
            token_mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Unweighted auxiliary losses and routing statistics of one layer, of the tokens of
  token_mask [T] (all without one)."""
  zero = jnp.zeros((), jnp.float32)
  aux = {"expert_balance_loss": zero, "device_balance_loss": zero, "z_loss": zero}
  m = token_mask
  if route.scores is not None:
    aux["expert_balance_loss"] = balance.expert_balance_loss(route.scores, route.expert_idx, m)
    # Default groups: the expert-parallel shards of the active mesh (1 without one).
    groups = cfg.n_device_groups or meshes.axis_size(meshes.active_mesh(), "expert")
    aux["device_balance_loss"] = balance.device_balance_loss(route.scores, route.expert_idx,
                                                             groups, m)
    aux["z_loss"] = balance.z_loss(route.logits, m)
  aux.update(balance.routing_stats(route.expert_idx, cfg.n_routed_experts, n_dropped,
                                   route.scores, m))
  # The routed gates' sum per token.
  aux["gate_mass"] = balance.token_mean(jnp.sum(route.gates, axis=-1), m)
  return aux
