"""Expert parallelism: routed experts split over the mesh's `expert` axis, tokens moved to
the shard that owns their expert by all_to_all, and back.

Inside shard_map, each device holds T_loc tokens (tokens are split over every non-tensor
axis) and E / P_e experts (P_e = size of the `expert` axis), with each expert's FFN width
split over `tensor`:

  1. every (token, choice) pair gets a slot in a send buffer [P_e, B, d], one block per
     destination shard (moe.dispatch.capacity's layout, with shards as "experts");
  2. all_to_all over `expert` swaps the blocks: the device now holds [P_e, B, d] rows from
     every source, each tagged with its local expert;
  3. the rows go through the same sort + grouped matmul as single-device (the backend's
     kernels: Pallas on TPU);
  4. all_to_all sends the outputs back and each token sums its gated choices.

B = T_loc * K' (the default) is the static worst case: no pair is ever dropped, at the
price of P_e-fold buffers. `capacity_factor` c > 0 uses B = ceil(c * T_loc * K' / P_e)
and reports how many pairs found their block full. (`lax.ragged_all_to_all` would send only
the filled rows but does not run on CPU; this is the path every platform runs.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from moe.dispatch import capacity, sorting
from moe.dispatch.backend import Backend
from moe.dispatch.experts import grouped_swiglu
from moe.parallel.mesh import BATCH_AXES, MeshError


def block_rows(t_local: int, k: int, n_shards: int, capacity_factor: float) -> int:
  """Rows per destination block B of the send/receive buffers."""
  if capacity_factor <= 0:
    return t_local * k
  return max(1, math.ceil(capacity_factor * t_local * k / n_shards))


def all_to_all_bytes(t_local: int, k: int, d_model: int, n_shards: int, capacity_factor: float,
                     itemsize: int) -> int:
  """Bytes one device sends per MoE layer forward: the (P_e - 1) / P_e of the [P_e, B, d]
  token buffer (there and back) and of the [P_e, B] int32 expert tags that leave the
  device. The backward pass sends the token buffers again."""
  b = block_rows(t_local, k, n_shards, capacity_factor)
  return (n_shards - 1) * b * (2 * d_model * itemsize + 4)


def _local_experts(x, gates, expert_idx, w_gate, w_up, w_down, *, backend: Backend, n_shards: int,
                   cap: int):
  """One device. x: [T_loc, d], gates/expert_idx: [T_loc, K'], w_*: this shard's experts
  [E_loc, d, f_loc] / [E_loc, f_loc, d] -> (partial y [1, T_loc, d], dropped pairs [1])."""
  e_local = w_gate.shape[0]
  d = x.shape[-1]
  slots = capacity.assign_slots(expert_idx // e_local, n_shards, cap)
  send = capacity.to_slots(x, slots, n_shards)                                   # [P, B, d]
  # Each slot's expert on the destination shard; e_local marks an empty slot.
  slot_expert = (jnp.full((n_shards * cap + 1,), e_local, jnp.int32)
                 .at[slots.pair_slot.reshape(-1)].set((expert_idx % e_local).reshape(-1))[:-1])
  recv = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True).reshape(-1, d)
  recv_expert = jax.lax.all_to_all(slot_expert.reshape(n_shards, cap), "expert", 0, 0, tiled=True)

  # Empty slots sort last (group e_local) and are left out of the grouped matmul.
  routing = sorting.sort_by_expert(recv_expert.reshape(-1, 1), e_local + 1)
  rows = backend.permute(recv, routing, 1)
  out = grouped_swiglu(rows, routing.group_sizes[:e_local], w_gate, w_up, w_down,
                       gmm=backend.gmm)
  out = backend.combine(out, routing, jnp.ones((recv.shape[0], 1), out.dtype))
  back = jax.lax.all_to_all(out.reshape(n_shards, cap, d), "expert", 0, 0, tiled=True)
  y = capacity.from_slots(back, slots, gates)
  return y[None], slots.n_dropped.reshape(1)


def expert_parallel_moe(x: jax.Array, gates: jax.Array, expert_idx: jax.Array, weights,
                        backend: Backend, mesh: Mesh,
                        capacity_factor: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """x: [T, d] (T split over the batch axes), gates, expert_idx: [T, K'], weights: routed
  experts ([E, d, f], [E, d, f], [E, f, d]) -> (sum_k g_k expert_k(x) [T, d], dropped pairs)."""
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
  cap = block_rows(n_tokens // token_shards, k, n_shards, capacity_factor)
  tokens = P(BATCH_AXES, None)
  w_in, w_out = P("expert", None, "tensor"), P("expert", "tensor", None)

  def local(*args):
    return _local_experts(*args, backend=backend, n_shards=n_shards, cap=cap)

  partial, dropped = jax.shard_map(
      local, mesh=mesh,
      in_specs=(tokens, tokens, tokens, w_in, w_in, w_out),
      out_specs=(P("tensor", BATCH_AXES, None), P(BATCH_AXES)),
      check_vma=False,
  )(x, gates, expert_idx, *weights)
  # Each tensor shard holds its slice of the FFN width's contribution: sum them here, outside
  # shard_map, so autodiff sees a plain sum.
  return jnp.sum(partial, axis=0), jnp.sum(dropped)
