"""The training objective: next-token cross-entropy plus the MoE layers' auxiliary losses,
each weighted by its alpha from the config and summed over layers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from moe.model.config import ModelConfig

if TYPE_CHECKING:
  from moe.model.decoder import Transformer

# aux entry of each MoE layer -> the ModelConfig field that weighs it
AUX_LOSS_WEIGHTS = {
    "expert_balance_loss": "expert_balance_alpha",
    "device_balance_loss": "device_balance_alpha",
    "z_loss": "router_z_loss_alpha",
}


def weighted_aux_losses(cfg: ModelConfig, stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
  losses = {name: jnp.zeros((), jnp.float32) for name in AUX_LOSS_WEIGHTS}
  for name, alpha_field in AUX_LOSS_WEIGHTS.items():
    if name in stats:
      losses[name] = getattr(cfg, alpha_field) * jnp.sum(stats[name])
  losses["aux_loss"] = sum(losses[name] for name in AUX_LOSS_WEIGHTS)
  return losses


def lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Mean next-token cross-entropy. logits: [B, S, V], targets, weights: [B, S]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  if weights is None:
    return jnp.mean(nll)
  weights = weights.astype(jnp.float32)
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def objective(model: "Transformer", tokens, targets, weights=None, segment_ids=None,
              positions=None, key=None):
  """The training objective: LM loss plus weighted auxiliary losses -> (loss, metrics)."""
  logits, aux = model(tokens, segment_ids, positions, key)
  lm = lm_loss(logits, targets, weights)
  metrics = {"lm_loss": lm, **aux["losses"], "layers": aux["layers"]}
  return lm + aux["losses"]["aux_loss"], metrics
