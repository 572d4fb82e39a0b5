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


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """[B, S] next-token cross-entropy of each position. logits: [B, S, V], targets: [B, S]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def weighted_mean(nll: jax.Array, weights: jax.Array | None) -> jax.Array:
  if weights is None:
    return jnp.mean(nll)
  weights = weights.astype(jnp.float32)
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Mean next-token cross-entropy. logits: [B, S, V], targets, weights: [B, S]."""
  return weighted_mean(token_nll(logits, targets), weights)


def real_tokens(segment_ids: jax.Array | None, weights: jax.Array | None = None) -> jax.Array | None:
  """[B, S] bool: the positions that are not padding, whose routing the MoE layers' losses
  and statistics count. Padding (data.packing, data.input_pipeline.padding_batch) belongs
  to no document (segment id 0) and carries no loss weight; a token with a weight counts
  even in segment 0 (rows built without packing). No segment ids: None, every token counts."""
  if segment_ids is None:
    return None
  real = segment_ids > 0
  return real if weights is None else real | (weights > 0)


def _chunks(h: jax.Array, targets: jax.Array, weights: jax.Array | None, chunk: int):
  """h [B, S, d], targets and weights [B, S], padded to whole chunks -> each split
  [n, B, chunk, ...] (padded positions weigh nothing), and the padded length."""
  b, s, _ = h.shape
  weights = jnp.ones((b, s), jnp.float32) if weights is None else weights.astype(jnp.float32)
  pad = (-s) % chunk
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets, weights = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(weights, ((0, 0), (0, pad)))
  split = lambda a: jnp.moveaxis(a.reshape(b, (s + pad) // chunk, chunk, *a.shape[2:]), 1, 0)
  return split(h), split(targets), split(weights)


def _chunk_nll(h_c: jax.Array, t_c: jax.Array, w_head: jax.Array) -> jax.Array:
  logits = jnp.einsum("bcd,dv->bcv", h_c, w_head, preferred_element_type=jnp.float32)
  return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, t_c[..., None], -1)[..., 0]


def chunked_token_nll(h: jax.Array, lm_head: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
  """[B, S] token_nll of logits = h @ lm_head, `chunk` positions of every row at a time
  (evaluation: no [B, S, V] array, and nothing kept for a backward pass)."""
  b, s, _ = h.shape
  h_n, t_n, _ = _chunks(h, targets, None, chunk)
  w_head = lm_head.astype(h.dtype)
  out = jax.lax.map(lambda part: _chunk_nll(*part, w_head), (h_n, t_n))  # [n, B, chunk]
  return jnp.moveaxis(out, 0, 1).reshape(b, -1)[:, :s]


def chunked_lm_loss(h: jax.Array, lm_head: jax.Array, targets: jax.Array,
                    weights: jax.Array | None, chunk: int) -> jax.Array:
  """lm_loss of logits = h @ lm_head, computed `chunk` positions of every row at a time.
  h: [B, S, d], lm_head: [d, V], targets, weights: [B, S]. Each chunk's [B, chunk, V] f32
  logits live only inside its step and are recomputed in the backward pass, so the
  [B, S, V] array never exists; the batch axis stays whole, so its sharding is kept."""
  parts = _chunks(h, targets, weights, chunk)
  w_head = lm_head.astype(h.dtype)

  @jax.checkpoint
  def step(total, part):
    h_c, t_c, w_c = part
    return total + jnp.sum(_chunk_nll(h_c, t_c, w_head) * w_c), None

  total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), parts)
  return total / jnp.maximum(jnp.sum(parts[2]), 1.0)


def objective(model: "Transformer", tokens, targets, weights=None, segment_ids=None,
              positions=None, key=None, mask_padding: bool = True, token_losses: bool = False):
  """The training objective: LM loss plus weighted auxiliary losses -> (loss, metrics).
  With ModelConfig.loss_chunk_tokens the LM head and cross-entropy run in chunks. The
  auxiliary losses and routing statistics are of the real tokens (real_tokens): padding
  adds nothing to them; mask_padding=False counts every token (fully packed batches: the
  same values, without a masked sum's different rounding). token_losses (evaluation):
  metrics also hold 'token_nll' [B, S], each position's NLL times its weight."""
  chunk = model.cfg.loss_chunk_tokens
  mask = real_tokens(segment_ids, weights) if mask_padding else None
  nll = None
  if chunk:
    h, stats = model.hidden_states(tokens, segment_ids, positions, key, mask)
    with jax.named_scope("lm_head_loss"):
      if token_losses:
        nll = chunked_token_nll(h, model.lm_head[...], targets, chunk)
        lm = weighted_mean(nll, weights)
      else:
        lm = chunked_lm_loss(h, model.lm_head[...], targets, weights, chunk)
    aux = {"layers": stats, "losses": weighted_aux_losses(model.cfg, stats)}
  else:
    logits, aux = model(tokens, segment_ids, positions, key, mask)
    with jax.named_scope("lm_head_loss"):
      nll = token_nll(logits, targets)
      lm = weighted_mean(nll, weights)
  metrics = {"lm_loss": lm, **aux["losses"], "layers": aux["layers"]}
  if token_losses:
    metrics["token_nll"] = nll if weights is None else nll * weights.astype(jnp.float32)
  return lm + aux["losses"]["aux_loss"], metrics
