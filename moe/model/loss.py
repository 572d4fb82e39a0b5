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
    "seq_balance_loss": "seq_balance_alpha",
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


def real_tokens(segment_ids: jax.Array | None, weights: jax.Array | None = None) -> jax.Array | None:
  """[B, S] bool: the positions that are not padding, whose routing the MoE layers' losses
  and statistics count. Padding (data.packing, data.input_pipeline.padding_batch) belongs
  to no document (segment id 0) and carries no loss weight; a token with a weight counts
  even in segment 0 (rows built without packing). No segment ids: None, every token counts."""
  if segment_ids is None:
    return None
  real = segment_ids > 0
  return real if weights is None else real | (weights > 0)


def chunked_lm_loss(h: jax.Array, lm_head: jax.Array, targets: jax.Array,
                    weights: jax.Array | None, chunk: int) -> jax.Array:
  """lm_loss of logits = h @ lm_head, computed `chunk` positions of every row at a time.
  h: [B, S, d], lm_head: [d, V], targets, weights: [B, S]. Each chunk's [B, chunk, V] f32
  logits live only inside its step and are recomputed in the backward pass, so the
  [B, S, V] array never exists; the batch axis stays whole, so its sharding is kept."""
  b, s, _ = h.shape
  weights = jnp.ones((b, s), jnp.float32) if weights is None else weights.astype(jnp.float32)
  pad = (-s) % chunk
  if pad:  # padded positions weigh nothing
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets, weights = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(weights, ((0, 0), (0, pad)))
  n = (s + pad) // chunk
  split = lambda a: jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)  # [n, B, chunk, ...]
  w_head = lm_head.astype(h.dtype)

  @jax.checkpoint
  def step(total, part):
    h_c, t_c, w_c = part
    logits = jnp.einsum("bcd,dv->bcv", h_c, w_head, preferred_element_type=jnp.float32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, t_c[..., None], -1)[..., 0]
    return total + jnp.sum(nll * w_c), None

  total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), (split(h), split(targets), split(weights)))
  return total / jnp.maximum(jnp.sum(weights), 1.0)


def objective(model: "Transformer", tokens, targets, weights=None, segment_ids=None,
              positions=None, key=None, mask_padding: bool = True):
  """The training objective: LM loss plus weighted auxiliary losses -> (loss, metrics).
  With ModelConfig.loss_chunk_tokens the LM head and cross-entropy run in chunks. The
  auxiliary losses and routing statistics are of the real tokens (real_tokens): padding
  adds nothing to them; mask_padding=False counts every token (fully packed batches: the
  same values, without a masked sum's different rounding)."""
  chunk = model.cfg.loss_chunk_tokens
  mask = real_tokens(segment_ids, weights) if mask_padding else None
  if chunk:
    h, stats = model.hidden_states(tokens, segment_ids, positions, key, mask)
    with jax.named_scope("lm_head_loss"):
      lm = chunked_lm_loss(h, model.lm_head[...], targets, weights, chunk)
    aux = {"layers": stats, "losses": weighted_aux_losses(model.cfg, stats)}
  else:
    logits, aux = model(tokens, segment_ids, positions, key, mask)
    with jax.named_scope("lm_head_loss"):
      lm = lm_loss(logits, targets, weights)
  metrics = {"lm_loss": lm, **aux["losses"], "layers": aux["layers"]}
  return lm + aux["losses"]["aux_loss"], metrics
