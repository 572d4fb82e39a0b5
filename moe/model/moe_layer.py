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
    # Zero-compute targets have no shard, so a router with them is not split over experts.
    router_axes = ("embed", "expert" if not cfg.n_null_experts else None)
    self.router = (param(rngs, cfg, (cfg.d_model, cfg.n_route_targets), router_axes)
                   if ROUTERS[cfg.router].has_weights else None)
    self.experts = RoutedExperts(cfg, rngs)
    self.score_bias = (ScoreBias(jnp.zeros((cfg.n_route_targets,), jnp.float32))
                       if ROUTERS[cfg.router].score_bias else None)

  def __call__(self, x: jax.Array, token_ids: jax.Array, key: jax.Array | None = None,
               token_mask: jax.Array | None = None, n_seqs: int = 1):
    """x: [T, d_model], token_ids: [T] -> (y [T, d_model], aux: losses and routing stats).
    The T tokens are n_seqs sequences in order (the sequence-wise balance loss's unit).

    `key` enables stochastic routing (GShard's second expert) during training.
    `token_mask` [T] bool: the real tokens of a batch with padding; the losses and routing
    statistics are theirs alone (moe.model.balance). Every token is still routed and
    dispatched: y does not depend on the mask.
    """
    cfg = self.cfg
    spec = ROUTERS[cfg.router]
    bias = self.score_bias[...] if self.score_bias is not None else None
    iv = intervention.current()
    mesh = meshes.active_mesh()
    with jax.named_scope("router"):  # scopes name the parts of a compiled step (moe.train.plan)
      logits = routers.router_logits(x, self.router[...]) if self.router is not None else None
      route = spec.fn(RouteArgs(cfg, logits, token_ids, key, bias, expert_groups(cfg, mesh)))
      if iv.mask_top or iv.n_activated:
        route = intervention.rerouted(cfg, route, iv)
    cap = cfg.capacity_factor if iv.capacity_factor is None else iv.capacity_factor
    dropless = spec.dropless or cap <= 0  # capacity 0: Switch/GShard without dropping
    if route.keep is not None and dropless:
      route = route._replace(gates=jnp.where(route.keep, route.gates, 0.0))  # GShard's unkept 2nd
    aux = moe_aux(cfg, route, token_mask, n_seqs)
    route = without_null_experts(cfg, route)
    weights = self.experts.weights(x.dtype)
    with jax.named_scope("dispatch"):  # the expert matmuls inside: "routed_experts"
      if dropless and mesh is not None:
        backend = registry.resolve(cfg.dispatch_backend, meshes.target_platform(mesh))
        ep = expert_parallel_moe(x, route.gates, route.expert_idx, weights, backend, mesh,
                                 layer_capacity_factor(cfg.expert_capacity_factor, mesh),
                                 cfg.expert_block_factor, cfg.expert_exchange, token_mask,
                                 shard_reach(cfg, mesh))
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
    aux["dropped_fraction"] = balance.dropped_fraction(n_dropped, route.expert_idx, token_mask)
    if dropless and mesh is not None:
      aux.update(ep_stats)  # rounds and loads of expert parallelism, per layer
    if bias is not None:
      aux["score_bias"] = bias
    if iv.capture:
      aux["expert_idx"] = route.expert_idx
    return y, aux


def expert_groups(cfg: ModelConfig, mesh) -> int:
  """The expert groups of a group-limited router: cfg.n_group, or with 0 one group per
  expert-parallel shard of `mesh` (1 without one); checked against the experts."""
  if not ROUTERS[cfg.router].grouped:
    return 1
  groups = cfg.n_group or meshes.axis_size(mesh, "expert")
  if cfg.n_routed_experts % groups or not cfg.topk_group <= groups or \
      cfg.n_activated_experts > cfg.topk_group * (cfg.n_routed_experts // groups):
    raise ValueError(
        f"ModelConfig.n_group=0 asks for one expert group per expert shard, but the mesh has "
        f"{groups} shard(s) for n_routed_experts={cfg.n_routed_experts}, topk_group="
        f"{cfg.topk_group} and n_activated_experts={cfg.n_activated_experts}. Fix: a mesh whose "
        f"expert axis divides the experts and whose topk_group kept shards hold the top-k, or "
        f"an explicit n_group.")
  return groups


def shard_reach(cfg: ModelConfig, mesh) -> int | None:
  """The most expert shards of `mesh` one token's choices can span: topk_group groups' worth
  under a group-limited router whose groups tile the shards (None: no such limit)."""
  shards = meshes.axis_size(mesh, "expert")
  if not ROUTERS[cfg.router].grouped or cfg.topk_group >= (cfg.n_group or shards):
    return None
  groups = expert_groups(cfg, mesh)
  if groups % shards == 0:  # whole groups per shard
    return min(cfg.topk_group, shards)
  if shards % groups == 0:  # each group spans shards / groups shards
    return cfg.topk_group * (shards // groups)
  return None


def without_null_experts(cfg: ModelConfig, route: Route) -> Route:
  """Pairs routed to a zero-compute expert (index >= N') -> index N' ("no expert": the
  dispatch moves and multiplies nothing for them) with gate 0."""
  if not cfg.n_null_experts:
    return route
  real = route.expert_idx < cfg.n_routed_experts
  return route._replace(expert_idx=jnp.where(real, route.expert_idx, cfg.n_routed_experts),
                        gates=jnp.where(real, route.gates, 0.0))


def moe_aux(cfg: ModelConfig, route: Route, token_mask: jax.Array | None = None,
            n_seqs: int = 1) -> dict[str, jax.Array]:
  """Unweighted auxiliary losses and routing statistics of one layer's routing (before
  dispatch), of the tokens of token_mask [T] (all without one). With zero-compute experts
  the expert-level losses and `load` span all N' + n_null targets (the null share is
  balanced like an expert's); the device-level loss spans the real experts only."""
  zero = jnp.zeros((), jnp.float32)
  aux = {"expert_balance_loss": zero, "device_balance_loss": zero, "z_loss": zero,
         "seq_balance_loss": zero}
  m, n_real = token_mask, cfg.n_routed_experts
  if route.scores is not None:
    aux["expert_balance_loss"] = balance.expert_balance_loss(route.scores, route.expert_idx, m)
    if cfg.seq_balance_alpha:
      aux["seq_balance_loss"] = balance.seq_balance_loss(route.scores, route.expert_idx, n_seqs, m)
    # Default groups: the expert-parallel shards of the active mesh (1 without one).
    groups = cfg.n_device_groups or meshes.axis_size(meshes.active_mesh(), "expert")
    aux["device_balance_loss"] = balance.device_balance_loss(route.scores[:, :n_real],
                                                             route.expert_idx, groups, m)
    aux["z_loss"] = balance.z_loss(route.logits, m)
  aux.update(balance.routing_stats(route.expert_idx, cfg.n_route_targets, 0, route.scores, m))
  # The routed gates' sum per token, and how many of its choices are real experts.
  aux["gate_mass"] = balance.token_mean(jnp.sum(route.gates, axis=-1), m)
  aux["real_experts_per_token"] = balance.token_mean(
      jnp.sum(route.expert_idx < n_real, axis=-1).astype(jnp.float32), m)
  return aux
