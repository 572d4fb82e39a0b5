"""Expert parallelism: routed experts split over the mesh's `expert` axis, tokens moved to
the shard that owns their expert by all_to_all, and back.

Inside shard_map, each device holds T_loc tokens (tokens are split over every non-tensor
axis) and E / P_e experts (P_e = size of the `expert` axis), with each expert's FFN width
split over `tensor`. Two ways to move the tokens:

  dropless (default)  moe.parallel.rounds: blocks of c x the balanced share
      (`block_factor`, default 1.25), each token sent once per destination shard, overflow
      in extra rounds until every pair is served; a balanced step costs one round.
  capacity_factor c > 0  one exchange of blocks of B = ceil(c * T_loc * K' / P_e) pairs
      per destination (GShard's layout, shards as "experts"); pairs that find their block
      full are dropped and counted.
Either way the rows on arrival go through the same sort + grouped matmul as on one device
(the backend's `gmm`: Pallas on TPU). (`lax.ragged_all_to_all` would send only the filled
rows but does not run on CPU.) A "no expert" pair (expert index E) is sent nowhere: it
takes no slot in either exchange and is neither dropped nor unserved.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from moe.dispatch import capacity, sorting
from moe.dispatch.backend import Backend
from moe.dispatch.experts import grouped_swiglu
from moe.parallel import rounds
from moe.parallel import mesh as meshes
from moe.parallel.mesh import BATCH_AXES, MeshError


def block_rows(t_local: int, k: int, n_shards: int, capacity_factor: float) -> int:
  """Pairs per destination block B of the capacity exchange (capacity_factor > 0)."""
  return max(1, math.ceil(capacity_factor * t_local * k / n_shards))


def all_to_all_bytes(t_local: int, k: int, d_model: int, n_shards: int, capacity_factor: float,
                     itemsize: int) -> int:
  """Bytes one device sends per MoE layer forward in the capacity exchange: the
  (P_e - 1) / P_e of the [P_e, B, d] token buffer (there and back) and of the [P_e, B]
  int32 expert tags that leave the device. The backward pass sends the token buffers again."""
  b = block_rows(t_local, k, n_shards, capacity_factor)
  return (n_shards - 1) * b * (2 * d_model * itemsize + 4)


def layer_capacity_factor(capacity_factor: float, mesh) -> float:
  """The exchange a model layer uses: `capacity_factor` (0: dropless rounds), except on a
  CPU mesh spanning processes (gloo collectives), where dropless means one exchange with
  blocks that hold every pair (worst-case buffers). There an XLA:CPU device does not issue
  a program's collectives in one order: a two-process eval step on data:2,expert:4 hung with
  one device inside the layer loop's all-gather while the devices it waited for sat in the
  token-count all-reduce that does not depend on the loop (64 idle pool threads, so not the
  starvation moe/cpu_threads.py prevents in one process; seen with this fallback removed in
  tests/test_multihost.py's straight two-process run; a minimal program of the same two
  collectives did not hang). TPU, GPU and one-process CPU meshes run the rounds."""
  if capacity_factor <= 0 and meshes.target_platform(mesh) == "cpu" and \
      len({d.process_index for d in mesh.devices.flat}) > 1:
    return float(mesh.shape["expert"])
  return capacity_factor


class EPResult(NamedTuple):
  y: jax.Array          # [T, d]
  n_dropped: jax.Array  # [] pairs dropped (capacity) or left unserved (rounds: 0 unless broken)
  rounds: jax.Array     # [] rounds run (1 for the capacity exchange)
  max_block_load: jax.Array  # [] most pairs one device sent one shard, over the block's pairs
  rows_per_pair: jax.Array   # [] token rows sent per (token, choice) pair


def _capacity_experts(x, gates, expert_idx, w_gate, w_up, w_down, *, backend: Backend, n_shards: int,
                   cap: int, token_mask=None):
  """One device. x: [T_loc, d], gates/expert_idx: [T_loc, K'], w_*: this shard's experts
  [E_loc, d, f_loc] / [E_loc, f_loc, d] -> (partial y [1, T_loc, d], dropped pairs [1], of
  the tokens of token_mask [T_loc] with one)."""
  e_local = w_gate.shape[0]
  d = x.shape[-1]
  # A "no expert" pair (index E = n_shards * e_local) names shard n_shards: none. It takes
  # no slot and is not dropped (capacity.assign_slots), so no row is sent for it.
  slots = capacity.assign_slots(expert_idx // e_local, n_shards, cap, token_mask=token_mask)
  send = capacity.to_slots(x, slots, n_shards)                                   # [P, B, d]
  # Each slot's expert on the destination shard; e_local ("no expert") marks an empty slot.
  # Pairs without a slot (dropped, "no expert") write into the spare last entry.
  slot_expert = (jnp.full((n_shards * cap + 1,), e_local, jnp.int32)
                 .at[slots.pair_slot.reshape(-1)].set((expert_idx % e_local).reshape(-1))[:-1])
  recv = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True).reshape(-1, d)
  recv_expert = jax.lax.all_to_all(slot_expert.reshape(n_shards, cap), "expert", 0, 0, tiled=True)

  # Empty slots sort last, as "no expert" rows, and are left out of the grouped matmul.
  routing = sorting.sort_by_expert(recv_expert.reshape(-1, 1), e_local)
  rows = backend.permute(recv, routing, 1)
  out = grouped_swiglu(rows, routing.group_sizes, w_gate, w_up, w_down, gmm=backend.gmm)
  out = backend.combine(out, routing, jnp.ones((recv.shape[0], 1), out.dtype))
  back = jax.lax.all_to_all(out.reshape(n_shards, cap, d), "expert", 0, 0, tiled=True)
  y = capacity.from_slots(back, slots, gates)
  return y[None], slots.n_dropped.reshape(1)


def _round_experts(x, gates, expert_idx, w_gate, w_up, w_down, *, backend: Backend, n_shards: int,
                   blocks: rounds.Blocks, exchange: str):
  """One device, dropless in rounds -> (partial y [1, T_loc, d], its stats [1, 3])."""
  e_local = w_gate.shape[0]
  sched, stats = rounds.schedule(expert_idx, e_local, n_shards, blocks)
  y = rounds.rounds_moe(x, gates, w_gate, w_up, w_down, sched, backend=backend, e_local=e_local,
                        n_shards=n_shards, blocks=blocks, exchange=exchange)
  return y[None], jnp.stack([stats.rounds.astype(jnp.float32), stats.max_block_load, stats.rows_per_pair,
                             stats.unserved.astype(jnp.float32)])[None]


def expert_parallel_moe(x: jax.Array, gates: jax.Array, expert_idx: jax.Array, weights,
                        backend: Backend, mesh: Mesh, capacity_factor: float = 0.0,
                        block_factor: float = rounds.BLOCK_FACTOR,
                        exchange: str = "all_to_all",
                        token_mask: jax.Array | None = None,
                        reach: int | None = None) -> EPResult:
  """x: [T, d] (T split over the batch axes), gates, expert_idx: [T, K'] (in [0, E], E
  meaning "no expert"), weights: routed
  experts ([E, d, f], [E, d, f], [E, f, d]) -> sum_k g_k expert_k(x) [T, d] and statistics.
  capacity_factor > 0: one capacity exchange (drops); else dropless rounds of blocks of
  block_factor x the balanced share, exchanged by `exchange` (moe.parallel.rounds.EXCHANGES).
  token_mask: optional [T] bool, the real tokens of a batch with padding: the capacity
  exchange's n_dropped counts only theirs (every token is still sent, and the rounds'
  statistics are of the exchange's work, padding included). reach: the most expert shards
  one token's choices can span (a group-limited router), which sizes the dropless row blocks."""
  n_experts = weights[0].shape[0]
  n_shards = mesh.shape["expert"]
  if n_experts % n_shards:
    raise MeshError(f"{n_experts} routed experts do not split over expert axis of size "
                             f"{n_shards}; pick a mesh whose expert size divides {n_experts}")
  token_shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  n_tokens, k = expert_idx.shape
  if n_tokens % token_shards:
    raise MeshError(f"{n_tokens} tokens do not split over {token_shards} devices "
                             f"(axes {BATCH_AXES}); make the batch a multiple")
  t_local = n_tokens // token_shards
  tokens = P(BATCH_AXES, None)
  w_in, w_out = P("expert", None, "tensor"), P("expert", "tensor", None)
  inputs, specs = (x, gates, expert_idx), (tokens, tokens, tokens)
  if capacity_factor > 0:
    cap = block_rows(t_local, k, n_shards, capacity_factor)
    local = lambda *a: _capacity_experts(*a, backend=backend, n_shards=n_shards, cap=cap)
    if token_mask is not None:
      local = lambda x, g, i, m, *w: _capacity_experts(x, g, i, *w, backend=backend,
                                                       n_shards=n_shards, cap=cap, token_mask=m)
      inputs, specs = inputs + (token_mask.astype(bool),), specs + (P(BATCH_AXES),)
    second = P(BATCH_AXES)
  else:
    blocks = rounds.block_sizes(t_local, k, n_experts, n_shards, block_factor, reach)
    local = lambda *a: _round_experts(*a, backend=backend, n_shards=n_shards, blocks=blocks,
                                      exchange=exchange)
    second = P(BATCH_AXES, None)  # each device's statistics, reduced below
  partial, extra = jax.shard_map(
      local, mesh=mesh,
      in_specs=(*specs, w_in, w_in, w_out),
      out_specs=(P("tensor", BATCH_AXES, None), second),
      check_vma=False,
  )(*inputs, *weights)
  # Each tensor shard holds its slice of the FFN width's contribution: sum them here, outside
  # shard_map, so autodiff sees a plain sum.
  y = jnp.sum(partial, axis=0)
  if capacity_factor > 0:
    one = jnp.ones((), jnp.float32)
    return EPResult(y, jnp.sum(extra), one, one * 0, one)  # load/rows: not tracked here
  # Reduced outside shard_map: only the devices that exchange must agree on the rounds.
  stats = jax.lax.stop_gradient(extra)
  # Pairs the schedule left past the last round: counted, so a wrong schedule shows.
  return EPResult(y, jnp.sum(stats[:, 3]).astype(jnp.int32), jnp.max(stats[:, 0]), jnp.max(stats[:, 1]),
                  jnp.mean(stats[:, 2]))
