"""The KV cache: every layer's rotated keys and values of the tokens seen so far, in
preallocated arrays of a fixed [batch, max_len] so that decoding compiles once.

    keys[s], values[s]: [layers of stack s, batch, heads, max_len, head_dim]

One pair of arrays per LayerStack, stacked on 'layers' like its parameters (a scanned
stack carries them through lax.scan and writes its layer's slice in place). Heads come
before length so that attention's dots read a layer's cache as it lies (length first made
XLA copy the layer's cache transposed at every step); on a mesh the
batch is split over the batch axes and the heads over `tensor`, as the attention
activations are in training. Rows are right-padded: row b's token at position p sits in
slot p, so a query at position p sees exactly the slots 0..p (`visible`); slots past a
row's length hold stale keys that stay hidden until a new token overwrites them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from moe.model.config import ModelConfig
from moe.model.decoder import layer_runs
from moe.parallel import rules

CACHE_AXES = ("layers", "batch", "heads", "length", "head_dim")


class KVCache(NamedTuple):
  keys: tuple[jax.Array, ...]    # per stack [layers, B, H, max_len, Dh]
  values: tuple[jax.Array, ...]  # per stack [layers, B, H, max_len, Dh]

  @property
  def max_len(self) -> int:
    return self.keys[0].shape[3]


def cache_shapes(cfg: ModelConfig, batch: int, max_len: int, dtype) -> KVCache:
  """The cache's shapes and dtype (jax.ShapeDtypeStruct), nothing allocated."""
  shapes = tuple(jax.ShapeDtypeStruct((n, batch, cfg.n_heads, max_len, cfg.head_dim), jnp.dtype(dtype))
                 for _, n in layer_runs(cfg))
  return KVCache(shapes, shapes)


def cache_shardings(cache: KVCache, mesh: Mesh) -> KVCache:
  """NamedSharding of every cache array under the rules (batch and heads split)."""
  one = lambda a: NamedSharding(mesh, rules.partition_spec(CACHE_AXES, a.shape, mesh, "KV cache"))
  return jax.tree.map(one, cache)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype) -> KVCache:
  """Zeros of the cache's shape (jit it with `cache_shardings` as out_shardings to create it
  directly in its shards on a mesh)."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(cfg, batch, max_len, dtype))


def write(cache: jax.Array, layer: jax.Array | int, new: jax.Array, start: jax.Array) -> jax.Array:
  """cache: [layers, B, H, L, Dh]; new: [B, S, H, Dh] written at slots start[b] .. + S of
  `layer`, per row (start: [B] int32) -> the cache (in place under jit when donated)."""
  b, s = new.shape[:2]
  rows = jnp.arange(b, dtype=jnp.int32)[:, None]
  slots = start[:, None] + jnp.arange(s, dtype=jnp.int32)[None]  # [B, S]
  # One scatter in the cache's own layout (a vmapped update_slice transposed the whole
  # cache). Indices split by a slice put their [B, S] dimensions first: new's layout.
  out = cache.at[layer, rows, :, slots].set(new.astype(cache.dtype), mode="promise_in_bounds")
  return rules.constrain(out, CACHE_AXES)


def visible(positions: jax.Array, max_len: int) -> jax.Array:
  """positions: [B, S] of the queries -> [B, 1, S, max_len] bool: slot j is visible to a
  query at position p iff j <= p (the row's earlier tokens and itself)."""
  return (jnp.arange(max_len, dtype=jnp.int32) <= positions[:, :, None])[:, None]
