"""Tile sizes of the grouped matmuls (gmm, tgmm) per shape and dtype, and the dtypes they take.

A block's last two dims must be multiples of the (sublane, lane) tile, (8, 128) for 32-bit
and (16, 128) for 16-bit data, or span the whole axis; the kernels accept ragged last
blocks, so a tile need not divide its axis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

SUPPORTED = (jnp.float32, jnp.bfloat16)
# Bytes of VMEM one kernel step may take by gmm_vmem / tgmm_vmem: 4 MiB under the 16 MiB
# the TPU compiler allows a kernel by default on v4, v5e and v5p (v6e: 32), for the
# models' error.
VMEM_BUDGET = 12 * 2**20
STEP_SECONDS = 0.35e-6  # fixed cost of one grid step (Pallas TPU pipelining)
MXU_FLOPS = 4e14        # matmul rate the row tile is sized for (v5p bf16 ~459e12, v4 ~275e12)


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Tile sizes: rows (tm); gmm: contraction (tk) and output columns (tn); tgmm: the
  [tk, tn] block of each group's output."""
  tm: int = 128
  tk: int = 128
  tn: int = 128


def check_dtypes(name: str, a: jax.Array, b: jax.Array) -> None:
  """Both operands float32 or both bfloat16: what the MXU multiplies (TPUs have no f16 MXU
  pass, and a mixed pair would be cast on every visit)."""
  if a.dtype != b.dtype or a.dtype not in SUPPORTED:
    raise TypeError(f"{name}: operands must share one dtype of float32 or bfloat16, got "
                    f"{a.dtype} and {b.dtype}")


def lane_tile(dim: int, cap: int, halves: bool = False) -> int:
  """A block width along a lane axis: the whole axis when dim <= cap; else, of the multiples
  of 128 <= cap whose ragged last block wastes at most dim / 8, the one making the fewest
  blocks, then the least waste (1408 -> 768 under a cap of 1024); else 128. With `halves`
  (a parallel grid axis: v4 and v5p run those on two TensorCores, so one block would idle
  a core and three leave one a third idle) a dim of 256 or more takes an even number of
  blocks where one qualifies: 1408 -> 768 and 2048 -> 1024 under a cap of 2048."""
  if dim <= cap and (not halves or dim < 256):
    return dim
  blocks = lambda t: -(-dim // t)
  fits = [t for t in range(min(cap, dim) // 128 * 128, 127, -128) if blocks(t) * t - dim <= dim // 8]
  if halves and dim <= cap and not any(blocks(t) % 2 == 0 for t in fits):
    return dim
  key = lambda t: (halves and blocks(t) % 2 == 1, blocks(t), blocks(t) * t - dim)
  return min(fits, key=key) if fits else 128


def row_tile(m: int, num_groups: int, flops_per_row: float, fits: Callable[[int], bool]) -> int:
  """Rows per tile. A pass makes about m/tm + G visits (a group boundary inside a tile costs
  one more), each a fixed step cost c plus tm rows of w = flops_per_row / MXU_FLOPS seconds:
  (m/tm + G)(c + tm w) is least at tm = sqrt(m c / (G w)). That goes to the nearest of
  128, 256 and 512 (below 128 the step cost dominates; at DeepSeekMoE-16B's layer, m 24576
  and G 64, it is 128), and is halved while the blocks miss VMEM. An m under that is one
  tile of all m rows (a block may span a whole axis)."""
  best = math.sqrt(m * STEP_SECONDS * MXU_FLOPS / (max(num_groups, 1) * flops_per_row))
  tm = min((128, 256, 512), key=lambda t: abs(math.log(t / best)))
  while tm > 128 and not fits(tm):
    tm //= 2
  return min(tm, m)


def _shrink(caps: list[int], tiles: tuple[int, int], i: int) -> bool:
  """Lower cap i to the multiple of 128 below its tile (not under 128); False if it cannot."""
  new = max(128, (tiles[i] - 1) // 128 * 128)
  if new >= tiles[i]:
    return False
  caps[i] = new
  return True


def gmm_vmem(t: Tiling, itemsize: int, k: int) -> int:
  """VMEM bytes of a gmm step: double-buffered lhs, rhs and out blocks; the f32 product (and
  accumulator when k takes several blocks); masked copies of both operands when the last k
  block is ragged; and for f32 operands their split into three bf16 parts (HIGHEST
  precision's MXU passes). Within 1 MiB of what the TPU compiler allots on v5p (it reads
  rhs transposed at no extra cost)."""
  ops = t.tm * t.tk + t.tk * t.tn
  b = 2 * itemsize * (ops + t.tm * t.tn) + 4 * t.tm * t.tn
  b += 4 * t.tm * t.tn if k > t.tk else 0
  b += itemsize * ops if k % t.tk else 0
  return b + (6 * ops if itemsize == 4 else 0)


def tgmm_vmem(t: Tiling, itemsize: int, m: int) -> int:
  """VMEM bytes of a tgmm step: double-buffered lhs, dy and out blocks; the f32 accumulator;
  the masked lhs; dy masked too when m's last row tile is ragged (rows past m hold
  garbage); the f32 split as in gmm_vmem. Within 2 MiB of the TPU compiler's figure."""
  ops = t.tm * t.tk + t.tm * t.tn
  b = 2 * itemsize * (ops + t.tk * t.tn) + 4 * t.tk * t.tn + itemsize * t.tm * t.tk
  b += itemsize * t.tm * t.tn if m % t.tm else 0
  return b + (6 * ops if itemsize == 4 else 0)


def gmm_tiling(m: int, k: int, n: int, num_groups: int, dtype) -> Tiling:
  """Tiles for gmm, [m, k] x [G, k, n] (or [G, n, k] read transposed). tk: all of k while
  the blocks fit, so a visit is one matmul with no accumulator round trip, and the rhs
  block stays in VMEM over all of a group's row tiles (Pallas skips a copy whose block
  index repeats). tn: up to 2048, since lhs is read once per column tile. While gmm_vmem
  misses VMEM_BUDGET, caps step down by 128: tn's to 256, then tk's to 128, then tn's."""
  s = jnp.dtype(dtype).itemsize
  caps = [k, 2048]
  while True:
    tk, tn = lane_tile(k, caps[0]), lane_tile(n, caps[1], halves=True)
    fits = lambda tm, tk=tk, tn=tn: gmm_vmem(Tiling(tm, tk, tn), s, k) <= VMEM_BUDGET
    if fits(128) or not (tn > 256 and _shrink(caps, (tk, tn), 1) or _shrink(caps, (tk, tn), 0)
                         or _shrink(caps, (tk, tn), 1)):
      return Tiling(row_tile(m, num_groups, 2 * tk * tn, fits), tk, tn)


def tgmm_tiling(m: int, k: int, n: int, num_groups: int, dtype) -> Tiling:
  """Tiles for tgmm, [m, k]^T x [m, n] per group -> [G, k, n]. The [tk, tn] output block and
  its f32 accumulator stay in VMEM over a group's row tiles, and lhs and dy are read once
  per output block: both as large as tgmm_vmem allows under VMEM_BUDGET (up to 2048), the
  larger one's cap stepping down first."""
  s = jnp.dtype(dtype).itemsize
  caps = [2048, 2048]
  while True:
    tk, tn = lane_tile(k, caps[0]), lane_tile(n, caps[1], halves=True)
    fits = lambda tm, tk=tk, tn=tn: tgmm_vmem(Tiling(min(tm, m), tk, tn), s, m) <= VMEM_BUDGET
    first = 0 if tk >= tn else 1
    if fits(128) or not (_shrink(caps, (tk, tn), first) or _shrink(caps, (tk, tn), 1 - first)):
      return Tiling(row_tile(m, num_groups, 2 * tk * tn, fits), tk, tn)
