"""Evaluation-time interventions (the paper's analyses), read by the MoE layer while it is
traced: rule out each token's top experts, route to more or fewer experts, switch the
shared experts off, record the choices, change the capacity factor.

    with intervene(Intervention(mask_top=2)):
      loss = jax.jit(eval_fn)(state, batch)   # a fresh jit: the value is read when tracing
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe.model.config import ModelConfig
from moe.model.routers import Route, top_k
from moe.scoped import ScopedValue


class Intervention(NamedTuple):
  mask_top: int = 0                # disable each token's this many highest-scoring routed experts
  resoftmax: bool = False          # ... and renormalise the scores over the experts left (gates sum as a softmax over them)
  n_activated: int | None = None   # route each token to this many experts (None: the config's K')
  drop_shared: bool = False        # switch the shared experts off
  capture: bool = False            # add each token's chosen experts to aux ('expert_idx' [T, K'])
  capacity_factor: float | None = None  # capacity routers: this factor instead of the config's


_INTERVENTION: ScopedValue[Intervention] = ScopedValue(Intervention())


def intervene(intervention: Intervention):
  """Trace the model with this intervention (jit a fresh function inside the block)."""
  return _INTERVENTION.bound_to(intervention)


def current() -> Intervention:
  """The intervention the model is being traced under (the default changes nothing)."""
  return _INTERVENTION.current


def rerouted(cfg: ModelConfig, route: Route, iv: Intervention) -> Route:
  """Top-K from the scores once each token's `mask_top` best experts are ruled out; gates
  stay the original probabilities (renormalised only where the router renormalises), or with
  `resoftmax` the probabilities renormalised over the experts not ruled out."""
  if route.scores is None:
    raise ValueError(f"router {cfg.router!r} has no scores to re-route by")
  k = iv.n_activated or route.expert_idx.shape[-1]
  scores = route.scores
  if iv.mask_top:
    _, top = jax.lax.top_k(scores, iv.mask_top)
    ruled_out = jnp.zeros_like(scores, dtype=bool).at[jnp.arange(scores.shape[0])[:, None], top].set(True)
    if iv.resoftmax:  # softmax over the survivors' logits = the survivors' probabilities renormalised
      kept = jnp.where(ruled_out, 0.0, scores)
      scores = kept / jnp.maximum(kept.sum(-1, keepdims=True), jnp.finfo(kept.dtype).tiny)
    scores = jnp.where(ruled_out, -1.0, scores)  # probabilities are >= 0
  normalize = cfg.norm_topk_prob or cfg.router == "gshard"
  gates, idx = top_k(scores, k, normalize=normalize)
  return Route(gates, idx, route.scores, route.logits)
