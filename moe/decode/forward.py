"""The model run over a KV cache: S new tokens per row are embedded, each layer writes their
keys and values into its cache slots and attends over the cache, and the final-norm hidden
states come back. A prefill chunk is S = chunk tokens; a decode step is S = 1.

The model's own modules do the work (Attention.project / attend, Block.feed_forward,
Transformer.embed_tokens), so the cached path computes what the training forward does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.decode.kv_cache import KVCache, visible, write
from moe.model.decoder import Block, LayerStack, Transformer


def _block(block: Block, x, positions, mask, tokens, keys, values, layer, start):
  """One layer. x: [B, S, d]; keys, values: its stack's cache [layers, B, L, H, Dh]."""
  q, k, v = block.attn.project(block.attn_norm(x), positions)
  keys, values = write(keys, layer, k, start), write(values, layer, v, start)
  x = x + block.attn.attend(q, keys[layer], values[layer], mask)
  x, _ = block.feed_forward(x, tokens, None)  # aux (routing statistics) is unused here
  return x, keys, values


def _stack(stack: LayerStack, x, positions, mask, tokens, keys, values, start):
  """The stack's layers in order, scanned like training (cfg.scan_layers) or unrolled; the
  cache rides in the carry so each layer updates its slice in place."""
  graphdef, state = nnx.split(stack.blocks)

  def body(carry, layer):
    x, keys, values = carry
    layer_state, i = layer
    block = nnx.merge(graphdef, layer_state)
    return _block(block, x, positions, mask, tokens, keys, values, i, start), None

  carry = (x, keys, values)
  if stack.cfg.scan_layers:
    carry, _ = jax.lax.scan(body, carry, (state, jnp.arange(stack.count, dtype=jnp.int32)))
    return carry
  for i in range(stack.count):
    carry, _ = body(carry, (jax.tree.map(lambda a: a[i], state), i))
  return carry


def extend(model: Transformer, cache: KVCache, tokens: jax.Array, start: jax.Array):
  """tokens: [B, S] at positions start[b] .. start[b] + S - 1 (start: [B] int32) ->
  (final-norm hidden states [B, S, d_model], the cache with their keys and values)."""
  s = tokens.shape[1]
  positions = start[:, None] + jnp.arange(s, dtype=jnp.int32)[None]
  mask = visible(positions, cache.max_len)
  x = model.embed_tokens(tokens)
  keys, values = [], []
  for stack, k, v in zip(model.stacks, cache.keys, cache.values):
    x, k, v = _stack(stack, x, positions, mask, tokens, k, v, start)
    keys.append(k)
    values.append(v)
  return model.final_norm(x), KVCache(tuple(keys), tuple(values))
