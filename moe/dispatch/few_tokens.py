"""The few-token path (decoding: a handful of tokens per MoE layer): no sort and no buffers
sized by expert or by capacity.

    gather:       each (token, choice) pair takes its expert's weights [T*K', d, f] and
                  runs its own SwiGLU: reads T*K' expert matrices
    all experts:  every expert runs on every token, its output weighted by the token's
                  gate for it (0 where not chosen): reads the N' expert matrices once

Static shapes pick one: the gather where it saves reading at least GATHER_MIN_SAVED_BYTES
of expert weights (DeepSeekMoE-16B at batch 8: 48 of 64 experts of 17 MB in bf16), all
experts otherwise; at CPU scale the gather's per-row matmuls cost more than the bytes
they save (tiny_deepseekmoe on 2 cores: 60 us all experts vs 160 us gathered at T = 1).
The all-experts path does N'/K' times the routed FLOPs, which at a handful of tokens cost
less than reading the weights; for many tokens the sorted grouped-matmul backends are the
ones to use.

"No expert" pairs (index N'): the gather takes zero matrices for them (no expert's weights
are read, and none gets a gradient from them) but, shapes being static, still runs their
per-pair matmuls on those zeros; the all-experts path gives them weight 0, costing nothing
it would not spend anyway.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moe.dispatch.backend import Backend
from moe.dispatch.sorting import SortedRouting


def gathered_swiglu(x: jax.Array, expert_idx: jax.Array, gates: jax.Array, w_gate: jax.Array,
                    w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """Per-choice weight gathers. x: [T, d], expert_idx, gates: [T, K'], w_gate, w_up:
  [E, d, f], w_down: [E, f, d] -> sum_k gates[t, k] * expert_{idx[t, k]}(x[t]), [T, d]."""
  t, k = expert_idx.shape
  # "No expert" (index N', one past the last) gathers zeros: its output and every gradient
  # through it are exactly 0, whatever its gate.
  wg, wu, wd = (jnp.take(w, expert_idx.reshape(-1), axis=0, mode="fill", fill_value=0)
                for w in (w_gate, w_up, w_down))
  # One row-vector matmul per (token, choice) pair n: [n, 1, d] x [n, d, f], the batch
  # dimension first (XLA:CPU ran 'td,tkdf->tkf' 3x slower).
  xn = jnp.repeat(x, k, axis=0)[:, None, :]                                      # [T*K', 1, d]
  h = jax.nn.silu(jnp.einsum("nid,ndf->nif", xn, wg)) * jnp.einsum("nid,ndf->nif", xn, wu)
  h = h * gates.reshape(-1, 1, 1).astype(h.dtype)
  return jnp.sum(jnp.einsum("nif,nfd->nid", h, wd).reshape(t, k, -1), axis=1)


def all_experts_swiglu(x: jax.Array, expert_idx: jax.Array, gates: jax.Array, w_gate: jax.Array,
                       w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """Every expert on every token, weighted by the token's summed gates for it: the same
  result as `gathered_swiglu`, shapes as there."""
  e, t = w_gate.shape[0], x.shape[0]
  # Row E collects the "no expert" pairs' gates and is cut off.
  weight = jnp.zeros((e + 1, t), jnp.float32).at[expert_idx, jnp.arange(t)[:, None]].add(
      gates.astype(jnp.float32))[:e]                                              # [E, T]
  xe = jnp.broadcast_to(x, (e, *x.shape))  # experts as the leading batch dimension: [E, T, d]
  h = jax.nn.silu(jnp.einsum("etd,edf->etf", xe, w_gate)) * jnp.einsum("etd,edf->etf", xe, w_up)
  h = h * weight[..., None].astype(h.dtype)
  return jnp.sum(jnp.einsum("etf,efd->etd", h, w_down), axis=0)


GATHER_MIN_SAVED_BYTES = 16 << 20


def picks_gather(n_pairs: int, w_gate: jax.Array) -> bool:
  """Whether gathering n_pairs expert matrices saves enough bytes over reading all N'."""
  e, d, f = w_gate.shape
  return (e - n_pairs) * 3 * d * f * w_gate.dtype.itemsize >= GATHER_MIN_SAVED_BYTES


def few_tokens_swiglu(x, expert_idx, gates, w_gate, w_up, w_down) -> jax.Array:
  """The cheaper of the two for these shapes (see the module docstring)."""
  fn = gathered_swiglu if picks_gather(expert_idx.size, w_gate) else all_experts_swiglu
  return fn(x, expert_idx, gates, w_gate, w_up, w_down)


def expert_of_pairs(routing: SortedRouting, shape: tuple[int, int]) -> jax.Array:
  """The [T, K'] expert index that a sorted routing was built from (its inverse), N' for
  the "no expert" rows past the groups."""
  n_pairs = routing.order.shape[0]
  n_experts = routing.group_sizes.shape[0]
  sizes = jnp.append(routing.group_sizes, n_pairs - jnp.sum(routing.group_sizes))
  row_expert = jnp.repeat(jnp.arange(n_experts + 1, dtype=jnp.int32), sizes,
                          total_repeat_length=n_pairs)
  return jnp.zeros((n_pairs,), jnp.int32).at[routing.order].set(row_expert).reshape(shape)


@dataclasses.dataclass(frozen=True)
class FewTokensBackend(Backend):
  """Dropless routed experts without sorting (`routed` takes the expert indices as they
  are). `gmm`, `permute` and `combine` stay the sorted path's, for expert parallelism's
  local rows."""

  def routed(self, x, expert_idx, gates, weights):
    return few_tokens_swiglu(x, expert_idx, gates, *weights)

  def experts(self, x, routing, gates, weights):
    return few_tokens_swiglu(x, expert_of_pairs(routing, gates.shape), gates, *weights)
