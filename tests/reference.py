"""Naive references for tests: one expert at a time, every token, obviously correct."""

import numpy as np
import jax.numpy as jnp

from moe.dispatch.experts import swiglu


def loop_moe(x, expert_idx, gates, w_gate, w_up, w_down, keep=None):
  """x: [T, d]; expert_idx, gates, keep: [T, K']; w_*: stacked [E, ...] -> [T, d].

  Every expert runs on every token; a token's output takes expert e's result times the
  sum of its gates for e (0 where it did not choose e, or the choice was not kept).
  """
  if keep is None:
    keep = jnp.ones(expert_idx.shape, bool)
  y = jnp.zeros_like(x)
  for e in range(w_gate.shape[0]):
    weight = jnp.sum(jnp.where((expert_idx == e) & keep, gates, 0.0), axis=-1)
    y = y + weight[:, None].astype(x.dtype) * swiglu(x, w_gate[e], w_up[e], w_down[e])
  return y


def capacity_keep(expert_idx, n_experts, cap, keep=None):
  """Which (token, choice) pairs fit: first choices of all tokens, then second choices."""
  expert_idx = np.asarray(expert_idx)
  keep = np.ones(expert_idx.shape, bool) if keep is None else np.asarray(keep)
  fits = np.zeros(expert_idx.shape, bool)
  used = [0] * n_experts
  for k in range(expert_idx.shape[1]):
    for t in range(expert_idx.shape[0]):
      e = expert_idx[t, k]
      if keep[t, k] and used[e] < cap:
        used[e] += 1
        fits[t, k] = True
  return fits


def all_to_all_bytes_sent(hlo: str, n_shards: int) -> int:
  """Bytes one device sends through the all-to-alls of compiled HLO text (32-bit
  operands): every all-to-all's result minus the block that stays on the device."""
  import math
  import re

  total = 0
  for line in hlo.splitlines():
    if " all-to-all(" in line:
      result = line.split("=", 1)[1].split(" all-to-all(")[0]
      for _, dims in re.findall(r"(f32|s32)\[([\d,]+)\]", result):
        total += 4 * math.prod(int(v) for v in dims.split(","))
  return total * (n_shards - 1) // n_shards
