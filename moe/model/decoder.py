"""The decoder-only LM, top to bottom.

    tokens -> embed -> [Block] * n_layers -> RMSNorm -> lm_head -> logits

A Block is pre-norm attention plus a pre-norm FFN, dense or MoE. Consecutive layers of
the same kind form a LayerStack whose weights are stacked on a leading 'layers' axis and
applied with lax.scan, so compile time does not grow with depth. DeepSeekMoE 16B is two
stacks: layer 0 (dense) and layers 1..27 (MoE).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from moe.model.attention import Attention
from moe.model.config import ModelConfig
from moe.model.layers import RMSNorm, SwiGLU, param
from moe.model.loss import weighted_aux_losses
from moe.model.moe_layer import MoE
from moe.parallel.rules import constrain


ACTIVATIONS = ("batch", "length", "act_embed")  # logical axes of the residual stream [B, S, d]


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, kind: str, rngs: nnx.Rngs):
    self.kind = kind
    self.attn_norm = RMSNorm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.ffn_norm = RMSNorm(cfg, rngs)
    self.ffn = MoE(cfg, rngs) if kind == "moe" else SwiGLU(cfg, cfg.dense_ffn_width, rngs)

  def __call__(self, x, positions, segment_ids, token_ids, key, token_mask=None):
    """x: [B, S, d], positions, segment_ids, token_ids (token_mask): [B, S] -> (x, aux)."""
    with jax.named_scope("attention"):  # scopes name the parts of a compiled step (moe.train.plan)
      x = x + self.attn(self.attn_norm(x), positions, segment_ids)
    return self.feed_forward(x, token_ids, key, token_mask)

  def feed_forward(self, x, token_ids, key, token_mask=None):
    """The FFN half. x: [B, S, d] residual stream, token_ids: [B, S] -> (x + FFN(norm(x)), aux).
    token_mask: optional [B, S] bool, the tokens the MoE's losses and statistics are of."""
    h = self.ffn_norm(x)
    if self.kind != "moe":
      with jax.named_scope("dense_ffn"):
        return constrain(x + self.ffn(h), ACTIVATIONS), {}
    b, s, d = h.shape
    mask = None if token_mask is None else token_mask.reshape(b * s)
    y, aux = self.ffn(h.reshape(b * s, d), token_ids.reshape(b * s), key, mask, n_seqs=b)
    return constrain(x + y.reshape(b, s, d), ACTIVATIONS), aux


def layer_runs(cfg: ModelConfig) -> list[tuple[str, int]]:
  """Consecutive layers of one kind, e.g. 16B: [('dense', 1), ('moe', 27)]."""
  return [(kind, len(list(group))) for kind, group in itertools.groupby(cfg.layer_kinds)]


class LayerStack(nnx.Module):
  """`count` identical Blocks whose parameters are stacked on a leading 'layers' axis."""

  def __init__(self, cfg: ModelConfig, kind: str, count: int, rngs: nnx.Rngs):
    self.cfg = cfg
    self.count = count

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(cfg, kind, rngs)

    self.blocks = make(rngs)
    for _, var in nnx.iter_graph(self.blocks):
      if isinstance(var, nnx.Param):
        var.set_metadata(axes=("layers",) + tuple(var.get_metadata()["axes"]))

  def __call__(self, x, positions, segment_ids, token_ids, key, token_mask=None):
    """x: [B, S, d] -> (x, aux with a leading [count] axis on every entry)."""
    graphdef, state = nnx.split(self.blocks)
    keys = None if key is None else jax.random.split(key, self.count)

    def body(x, layer):
      layer_state, layer_key = layer
      return nnx.merge(graphdef, layer_state)(x, positions, segment_ids, token_ids, layer_key,
                                              token_mask)

    if self.cfg.remat:
      body = jax.checkpoint(body)
    if self.cfg.scan_layers:
      return jax.lax.scan(body, x, (state, keys))
    auxes = []
    for i in range(self.count):
      layer = jax.tree.map(lambda a: a[i], (state, keys))
      x, aux = body(x, layer)
      auxes.append(aux)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *auxes)


class Transformer(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = param(rngs, cfg, (cfg.vocab_size, cfg.d_model), ("embed_vocab", "embed"))
    self.stacks = nnx.List([LayerStack(cfg, kind, n, rngs) for kind, n in layer_runs(cfg)])
    self.final_norm = RMSNorm(cfg, rngs)
    self.lm_head = param(rngs, cfg, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """tokens: [B, S] int -> the residual stream's input [B, S, d_model] in the compute dtype."""
    # FSDP: gather the table whole before the row lookup, as for every other weight.
    with jax.named_scope("embedding"):
      table = constrain(self.embed[...], ("embed_vocab", "act_embed"))
      x = jnp.take(table, tokens, axis=0).astype(jnp.dtype(self.cfg.dtype))
      return constrain(x, ACTIVATIONS)

  def logits(self, h: jax.Array) -> jax.Array:
    """h: [..., d_model] final-norm hidden states -> logits [..., vocab] in fp32."""
    with jax.named_scope("lm_head_loss"):
      return jnp.einsum("...d,dv->...v", h, self.lm_head[...].astype(h.dtype),
                        preferred_element_type=jnp.float32)

  def hidden_states(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                    positions: jax.Array | None = None, key: jax.Array | None = None,
                    token_mask: jax.Array | None = None):
    """tokens: [B, S] int -> (final-norm hidden states [B, S, d_model], per-layer MoE aux).

    segment_ids: [B, S] packed-document ids (attention stays within a document);
    positions: [B, S] rotary positions (restart at each document); key: routing randomness;
    token_mask: [B, S] bool, the real tokens (not padding: moe.model.loss.real_tokens) the
    MoE layers' losses and routing statistics are of (default: every token). The hidden
    states do not depend on it.
    """
    b, s = tokens.shape
    if segment_ids is None:
      segment_ids = jnp.zeros((b, s), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    x = self.embed_tokens(tokens)
    keys = [None] * len(self.stacks) if key is None else list(jax.random.split(key, len(self.stacks)))
    moe_aux = []
    for stack, k in zip(self.stacks, keys):
      x, aux = stack(x, positions, segment_ids, tokens, k, token_mask)
      if aux:
        moe_aux.append(aux)
    stats = jax.tree.map(lambda *a: jnp.concatenate(a), *moe_aux) if moe_aux else {}
    return self.final_norm(x), stats

  def update_score_bias(self, load: jax.Array) -> None:
    """After a training step, router topk_bias: b_i += u * sign(mean load - load_i) in every
    MoE layer. load: [n_moe_layers, N'] each expert's share of the step's assignments
    (aux['layers']['load'], in this model's MoE-layer order)."""
    row = 0
    for stack in self.stacks:
      ffn = stack.blocks.ffn
      if not isinstance(ffn, MoE):
        continue
      if ffn.score_bias is not None:
        rows = load[row:row + stack.count]
        error = jnp.mean(rows, axis=-1, keepdims=True) - rows
        ffn.score_bias[...] = ffn.score_bias[...] + self.cfg.bias_update_rate * jnp.sign(error)
      row += stack.count

  def __call__(self, tokens, segment_ids=None, positions=None, key=None, token_mask=None):
    """tokens: [B, S] -> (logits [B, S, vocab] fp32, aux).

    aux['layers']: per MoE layer [n_moe_layers, ...] unweighted losses and routing stats
    (of the tokens of token_mask, as hidden_states);
    aux['losses']: the auxiliary losses weighted by their alphas and summed over layers,
    with their total under 'aux_loss'.
    """
    h, stats = self.hidden_states(tokens, segment_ids, positions, key, token_mask)
    return self.logits(h), {"layers": stats, "losses": weighted_aux_losses(self.cfg, stats)}
