"""Dropless expert parallelism in rounds of fixed blocks sized to the balanced share.

One device (inside shard_map) holds T tokens with K' choices each and the E_l experts of
one of P expert shards. A (token, choice) pair goes to shard s = expert // E_l.

Schedule, from expert_idx alone (nothing has moved yet):
  pairs  a pair's rank among this device's pairs to s (token order) puts it in pair round
         q = rank // Bp at slot rank % Bp: a round carries at most Bp pairs per
         destination, Bp = ceil(c * T K' / P), c times the balanced share.
  rows   the pairs of one token in one block (q, s) share one row: the token's rank among
         the distinct tokens of the block gives its sub-round rank // Br and row slot
         rank % Br, Br = ceil(c * the distinct rows of a block under uniform routing)
         (`balanced_rows`): a token is sent once per destination shard, not once per expert.
  rounds every (q, sub) with work on some device, in order. One pmax of the per-q sub-round
         counts (a few int32) over the `expert` axis agrees the schedule within each
         all_to_all group; the loop then runs exactly that many rounds: 1 when routing is
         near balanced, more when skewed.

A round sends rows [P, Br, d] and pair tags [P, Bp] (row slot, local expert, gate) by
all_to_all (or, with exchange="ragged" on TPU/GPU, the rows by `lax.ragged_all_to_all`,
which moves only each block's filled rows; it does not run on CPU); on arrival each pair gathers its row, the pairs are sorted by expert and go
through the grouped matmul (empty slots sort last and are left out of it), each row sums
its gated pairs, and the rows go back. Nothing is dropped: overflow waits for a later
round. The backward pass runs the same rounds (custom_vjp), recomputing each round's
forward for its VJP, so memory holds one round at a time.

A "no expert" pair (expert index E, a zero-compute expert) goes to no shard: it takes no
pair slot, sends no row, counts towards no round and is never unserved; its output and
its gate's gradient are 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe.dispatch import sorting
from moe.dispatch.backend import Backend
from moe.dispatch.experts import grouped_swiglu

# Default c: blocks of 1.25x the balanced share (ModelConfig.expert_block_factor).
BLOCK_FACTOR = 1.25
EXCHANGES = ("all_to_all", "ragged")  # ModelConfig.expert_exchange


def balanced_rows_per_pair(n_experts: int, n_shards: int, k: int, reach: int | None = None) -> float:
  """Distinct (token, shard) rows per (token, choice) pair when K' distinct experts are
  drawn uniformly: each shard is hit with prob 1 - C(E - E_l, K') / C(E, K'). A group-
  limited router (`reach`: the most shards one token's choices can span) caps a token's
  rows at reach."""
  e_local = n_experts // n_shards
  miss = math.comb(n_experts - e_local, k) / math.comb(n_experts, k) if k <= n_experts - e_local else 0.0
  rows = n_shards * (1.0 - miss)
  return (rows if reach is None else min(rows, reach)) / k


class Blocks(NamedTuple):
  pairs: int   # Bp: pair slots per destination per round
  rows: int    # Br: row slots per destination per round
  q_max: int   # pair rounds a device can need: ceil(T * min(K', E_l) / Bp)


def block_sizes(t_local: int, k: int, n_experts: int, n_shards: int,
                factor: float = BLOCK_FACTOR, reach: int | None = None) -> Blocks:
  """Static block sizes for T = t_local tokens per device (`reach`: as balanced_rows_per_pair)."""
  e_local = n_experts // n_shards
  most_pairs = t_local * min(k, e_local)  # pairs one device can send to one shard
  bp = min(most_pairs, max(1, math.ceil(factor * t_local * k / n_shards)))
  br = min(bp, t_local, max(1, math.ceil(factor * t_local * k / n_shards
                                         * balanced_rows_per_pair(n_experts, n_shards, k, reach))))
  return Blocks(bp, br, -(-most_pairs // bp))


def round_bytes(blocks: Blocks, n_shards: int, d_model: int, itemsize: int) -> int:
  """Bytes one device sends in one round of the forward pass: rows there and back, and
  the pair tags (row slot and expert int32, gate f32), all but its own block."""
  return (n_shards - 1) * (2 * blocks.rows * d_model * itemsize + 12 * blocks.pairs)


def round_backward_bytes(blocks: Blocks, n_shards: int, d_model: int, itemsize: int) -> int:
  """Bytes one device sends in one round of the backward pass: the round's rows and tags go
  out again (its forward recomputed for the VJP; the rows' return trip is dead there and
  the compiler drops it), then the transposed row all_to_alls (both ways) and the gates'."""
  return (n_shards - 1) * (blocks.rows * d_model * itemsize + 12 * blocks.pairs) + \
      (n_shards - 1) * (2 * blocks.rows * d_model * itemsize + 4 * blocks.pairs)


class Schedule(NamedTuple):
  """Where each pair [T*K'] goes, and the rounds (all int32 but the bools). A "no expert"
  pair (not `real`) has shard P, expert E_l, the dump slots P * Bp and P * Br, round q_max
  (never run) and sub-round 0: it is never sent."""
  shard: jax.Array        # destination shard
  expert: jax.Array       # expert on that shard
  pair_slot: jax.Array    # s * Bp + slot
  row_slot: jax.Array     # s * Br + slot of its row
  first: jax.Array        # bool: the pair that sends its row (the token's first in the block)
  q: jax.Array            # pair round
  sub: jax.Array          # sub-round within q
  subs: jax.Array         # [q_max] sub-rounds of each pair round, agreed over the mesh
  n_rounds: jax.Array     # [] sum(subs)
  real: jax.Array         # bool: the pair has an expert


class Stats(NamedTuple):
  rounds: jax.Array          # [] rounds run (1 = everything fit the first blocks)
  max_block_load: jax.Array  # [] most pairs one device sends one shard, over Bp
  rows_per_pair: jax.Array   # [] rows sent per pair (< 1: tokens sent once per shard; a
                             #    "no expert" pair counts here and sends none)
  unserved: jax.Array        # [] pairs whose round is past the agreed count (0: all delivered)


def schedule(expert_idx: jax.Array, e_local: int, n_shards: int, blocks: Blocks,
             axis: str = "expert") -> tuple[Schedule, Stats]:
  """expert_idx: [T, K'] in [0, E], E = P * E_l meaning "no expert" -> the rounds, agreed by
  a pmax over `axis` (the all_to_all's: only the devices that exchange must agree), and
  this device's statistics. "No expert" pairs take no slot, row or round."""
  t, k = expert_idx.shape
  flat = expert_idx.reshape(-1)
  real = flat < n_shards * e_local
  shard = jnp.where(real, flat // e_local, n_shards)                             # P: none
  onehot = (shard[:, None] == jnp.arange(n_shards)).astype(jnp.int32)          # [T*K', P]
  # The column each pair reads its counts from; "no expert" pairs read shard 0's and are
  # masked below (they add nothing to any column, so no real pair's rank moves).
  col = jnp.minimum(shard, n_shards - 1)[:, None]
  rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), col, 1)[:, 0] - 1
  q = jnp.where(real, rank // blocks.pairs, blocks.q_max)
  n_blocks = n_shards * blocks.q_max
  # A token's pairs to one shard are adjacent in rank, so those in the same block share a
  # row. "No expert" pairs get block n_blocks, which no real pair shares.
  key = jnp.where(real, shard * blocks.q_max + q, n_blocks)
  sq = key.reshape(t, k)
  earlier = jnp.tril(jnp.ones((k, k), bool), -1)                               # [k, k'<k]
  same = (sq[:, :, None] == sq[:, None, :]) & earlier                           # [T, K', K']
  first = ~jnp.any(same, axis=-1)                                               # [T, K']
  owner = jnp.where(jnp.any(same, -1), jnp.argmax(same, -1), jnp.arange(k))     # [T, K']
  first = first.reshape(-1) & real
  rows_in_block = (jnp.zeros((n_blocks + 1,), jnp.int32).at[key].add(first.astype(jnp.int32))
                   [:n_blocks])
  rows_before = jnp.cumsum(rows_in_block) - rows_in_block   # keys of one shard are contiguous
  row_rank = jnp.take_along_axis(jnp.cumsum(onehot * first[:, None], axis=0), col, 1)[:, 0] - 1
  row_rank = row_rank - (rows_before[jnp.minimum(key, n_blocks - 1)] - rows_before[col[:, 0] * blocks.q_max])
  # Non-first pairs take their row's rank from the token's first pair in the block.
  row_rank = jnp.where(real, jnp.take_along_axis(row_rank.reshape(t, k), owner, 1).reshape(-1), 0)
  sub = row_rank // blocks.rows
  subs = -(-rows_in_block.reshape(n_shards, blocks.q_max) // blocks.rows)
  subs = jax.lax.pmax(jnp.max(subs, axis=0), axis)                              # [q_max]
  pairs_to = jnp.sum(onehot, axis=0)
  slot = lambda a, size: jnp.where(real, shard * size + a % size, n_shards * size).astype(jnp.int32)
  sched = Schedule(shard.astype(jnp.int32), jnp.where(real, flat % e_local, e_local).astype(jnp.int32),
                   slot(rank, blocks.pairs), slot(row_rank, blocks.rows),
                   first, q.astype(jnp.int32), sub.astype(jnp.int32), subs.astype(jnp.int32),
                   jnp.sum(subs).astype(jnp.int32), real)
  stats = Stats(rounds=jnp.sum(subs),
                max_block_load=jnp.max(pairs_to).astype(jnp.float32) / blocks.pairs,
                rows_per_pair=jnp.mean(first.astype(jnp.float32)),
                unserved=unserved(sched))
  return sched, stats


def unserved(sched: Schedule) -> jax.Array:
  """[] pairs whose round lies past the sched.n_rounds the loop runs (0 when every pair is
  delivered; "no expert" pairs are never due): pair round q's sub-round `sub` is round
  sum(subs[:q]) + sub of the order."""
  start = jnp.cumsum(sched.subs) - sched.subs
  q = jnp.minimum(sched.q, sched.subs.shape[0] - 1)  # q_max ("no expert") is masked
  return jnp.sum(sched.real & (start[q] + sched.sub >= sched.n_rounds)).astype(jnp.int32)


def _round_of(sched: Schedule, j: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Round j of the flattened (q, sub) order -> (q, sub)."""
  ends = jnp.cumsum(sched.subs)
  q = jnp.sum(ends <= j).astype(jnp.int32)
  return q, j - (ends[q] - sched.subs[q])


def _swap(a: jax.Array) -> jax.Array:
  """[P, ...] blocks: block s goes to shard s, block s comes from shard s."""
  return jax.lax.all_to_all(a, "expert", 0, 0, tiled=True)


def _ragged_swap(rows: jax.Array, sizes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """rows: [P, Br, d] whose block s has its sizes[s] filled rows first -> (the blocks from
  every shard, [P, Br, d], unfilled rows zero; their sizes [P]). Moves only filled rows."""
  n, br, d = rows.shape
  starts = jnp.arange(n, dtype=jnp.int32) * br
  recv_sizes = _swap(sizes)
  at_receiver = jnp.full((n,), jax.lax.axis_index("expert") * br, jnp.int32)  # my block there
  out = jax.lax.ragged_all_to_all(rows.reshape(n * br, d), jnp.zeros((n * br, d), rows.dtype),
                                  starts, sizes, at_receiver, recv_sizes, axis_name="expert")
  return out.reshape(n, br, d), recv_sizes


class RoundSends(NamedTuple):
  """What one device sends in one round."""
  active: jax.Array     # [T*K'] bool: the pairs of this round
  row_token: jax.Array  # [P * Br] token filling each row slot, T for an empty slot
  pair_at: jax.Array    # [T*K'] pair slot of each pair of the round, P * Bp (dump) for the rest


def round_sends(sched: Schedule, j, n_tokens: int, n_shards: int, blocks: Blocks) -> RoundSends:
  """Round j's rows and pair slots, from the schedule alone; "no expert" pairs are never
  active, so they fill no row slot and no pair slot."""
  q, sub = _round_of(sched, j)
  active = sched.real & (sched.q == q) & (sched.sub == sub)
  token = jnp.arange(sched.q.shape[0], dtype=jnp.int32) // (sched.q.shape[0] // n_tokens)
  # Which token fills each row slot, and each pair slot (dump slot last).
  row_at = jnp.where(active & sched.first, sched.row_slot, n_shards * blocks.rows)
  row_token = jnp.full((n_shards * blocks.rows + 1,), n_tokens, jnp.int32).at[row_at].set(token)[:-1]
  return RoundSends(active, row_token, jnp.where(active, sched.pair_slot, n_shards * blocks.pairs))


def _one_round(x, gates, w_gate, w_up, w_down, sched: Schedule, j, *, backend: Backend,
               e_local: int, n_shards: int, blocks: Blocks, exchange: str):
  """Round j's contribution to y: [T, d]."""
  t, d = x.shape
  bp, br = blocks.pairs, blocks.rows
  active, row_token, pair_at = round_sends(sched, j, t, n_shards, blocks)
  tag = lambda fill, value, dtype: (jnp.full((n_shards * bp + 1,), fill, dtype)
                                    .at[pair_at].set(value.astype(dtype))[:-1].reshape(n_shards, bp))
  pair_row = tag(br, sched.row_slot % br, jnp.int32)       # br: the empty slot's zero row
  pair_expert = tag(e_local, sched.expert, jnp.int32)
  pair_gate = tag(0, gates.reshape(-1), jnp.float32)
  x_pad = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])
  send = jnp.take(x_pad, row_token, axis=0).reshape(n_shards, br, d)

  pair_row, pair_expert, pair_gate = _swap(pair_row), _swap(pair_expert), _swap(pair_gate)
  if exchange == "ragged":
    # Entry P takes the "no expert" pairs (never active) and is cut off.
    sizes = (jnp.zeros((n_shards + 1,), jnp.int32)
             .at[sched.shard].add((active & sched.first).astype(jnp.int32))[:n_shards])
    recv, recv_sizes = _ragged_swap(send, sizes)
  else:
    recv = _swap(send)

  # Destination: pair p of source s reads row s * Br + pair_row (the zero row if empty).
  source = jnp.arange(n_shards, dtype=jnp.int32)[:, None]
  pair_row = jnp.where(pair_row < br, source * br + pair_row, n_shards * br).reshape(-1)
  rows_pad = jnp.concatenate([recv.reshape(-1, d), jnp.zeros((1, d), recv.dtype)])
  # Empty pair slots are tagged e_local, "no expert": sorted last, out of every group.
  routing = sorting.sort_by_expert(pair_expert.reshape(-1, 1), e_local)
  src_row = jnp.take(pair_row, routing.order)
  out = grouped_swiglu(jnp.take(rows_pad, src_row, axis=0), routing.group_sizes,
                       w_gate, w_up, w_down, gmm=backend.gmm)
  gate = jnp.take(pair_gate.reshape(-1), routing.order)[:, None]
  out_rows = (jnp.zeros((n_shards * br + 1, d), jnp.float32)
              .at[src_row].add(out.astype(jnp.float32) * gate)[:-1].astype(x.dtype))
  if exchange == "ragged":
    back = _ragged_swap(out_rows.reshape(n_shards, br, d), recv_sizes)[0].reshape(-1, d)
  else:
    back = _swap(out_rows.reshape(n_shards, br, d)).reshape(-1, d)
  return jnp.zeros((t + 1, d), x.dtype).at[row_token].add(back)[:t]


def rounds_moe(x, gates, w_gate, w_up, w_down, sched: Schedule, *, backend: Backend,
               e_local: int, n_shards: int, blocks: Blocks, exchange: str = "all_to_all") -> jax.Array:
  """One device: x [T, d], gates [T, K'], this shard's experts -> y [T, d] (this device's
  tensor slice of each expert's output)."""
  if exchange not in EXCHANGES:
    raise ValueError(f"exchange={exchange!r}: use one of {EXCHANGES}")
  static = dict(backend=backend, e_local=e_local, n_shards=n_shards, blocks=blocks, exchange=exchange)
  loop = lambda body, init, sched: jax.lax.while_loop(lambda c: c[0] < sched.n_rounds, body, init)

  @jax.custom_vjp
  def run(x, gates, wg, wu, wd, sched):
    def body(carry):
      j, y = carry
      return j + 1, y + _one_round(x, gates, wg, wu, wd, sched, j, **static)
    return loop(body, (jnp.int32(0), jnp.zeros_like(x)), sched)[1]

  def fwd(*args):
    return run(*args), args

  def bwd(res, dy):
    *inputs, sched = res

    def body(carry):
      j, grads = carry
      _, vjp = jax.vjp(lambda *a: _one_round(*a, sched, j, **static), *inputs)
      return j + 1, jax.tree.map(jnp.add, grads, vjp(dy))
    zeros = tuple(jnp.zeros_like(a) for a in inputs)
    return (*loop(body, (jnp.int32(0), zeros), sched)[1], None)  # sched: integers

  run.defvjp(fwd, bwd)
  return run(x, gates, w_gate, w_up, w_down, sched)
