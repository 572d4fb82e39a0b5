"""What the TPU compiler's own module says a compiled step costs, per instruction.

`compiled.cost_analysis()` is no step time: it counts a while loop's body once whatever its
trip count (our layers are a scan), and each scatter the compiler offloads to the v5p's
SparseCores adds about -2 s. The scheduled module text (`compiled.as_text()`,
`is_scheduled=true`: text order is the schedule) carries more: every fusion's
`backend_config` holds the compiler's `estimated_cycles`, Pallas kernels may carry a
`cost_estimate` (flops, bytes), and every instruction keeps the `op_name` of the JAX code
it came from, named scopes included. So a step's estimated time here is:

- fusions and convolutions: estimated cycles / the chip's clock (peak bf16 FLOP/s over the
  MXU's FLOPs per cycle), times the trip count of every loop around them;
- Pallas kernels: the roofline of their cost estimate (max of FLOPs / peak and bytes / HBM
  bandwidth); kernels with none are counted in `unestimated`;
- collectives: bytes on the wire / the chip's ICI bandwidth (one direction); a synchronous
  one is exposed, an asynchronous one (start ... done) hides behind the estimated time of
  what the schedule places between its start and done.

Every figure is an estimate: docs/plan.md calibrates them against published step times.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Callable

from moe.parallel.hlo_text import (Instruction, dims, group_size, operands, parse, partitions,
                                   shape_bytes, walk)

# Peak dense bf16 FLOP/s per chip (Google Cloud TPU documentation pages for each
# generation; sources in docs/plan.md).
PEAK_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}
# MXU FLOPs per cycle: 4 MXUs of 128x128 (v4, v5p: 2 cores x 4), 4 of 128x128 (v5e),
# 2 of 256x256 (v6e). peak / this = the clock the cycle estimates count.
_MXU_FLOPS_PER_CYCLE = {"v4": 262_144, "v5e": 131_072, "v5p": 262_144, "v6e": 524_288}
CLOCK_HZ = {g: PEAK_FLOPS[g] / f for g, f in _MXU_FLOPS_PER_CYCLE.items()}
HBM_BYTES_PER_S = {"v4": 1200e9, "v5e": 819e9, "v5p": 2765e9, "v6e": 1638e9}
# ICI per chip, both directions together (v4: not on its Cloud TPU page: None, no estimate).
ICI_BYTES_PER_S = {"v4": None, "v5e": 400e9, "v5p": 1200e9, "v6e": 800e9}

_SENTINEL = 2**62  # estimated_cycles of SparseCore-offloaded work: INT64_MAX, no estimate


def wire_bytes(ins: Instruction, kind: str, n_devices: int) -> float:
  """Bytes one chip sends for collective `kind` (ring algorithms)."""
  n = group_size(ins, n_devices)
  arrays = re.findall(r"\b[a-z]+\d*\[[\d,]*\]", ins.shape)
  if ins.opcode.endswith("-start") and len(arrays) > 1:
    arrays = arrays[1:2]  # a start's tuple is (operand, result, context...): the result
  size = sum(shape_bytes(a) for a in arrays)
  if kind == "all-reduce":
    return 2 * size * (n - 1) / n
  if kind == "reduce-scatter":
    return size * (n - 1)  # the result is one shard of n
  if kind == "collective-permute":
    return size
  return size * (n - 1) / n  # all-gather (result gathered), all-to-all


def _taps(window, lhs_labels: str, out_labels: str, lhs: list[int], out: list[int]) -> float:
  """Mean window taps per output position that land on input, not padding: the compiler
  writes some matmuls as a window of 16 over a dimension of 1 padded by 15 on each side."""
  sizes = [int(w) for w in window.group(1).split("x")]
  pads = [tuple(int(p) for p in pad.split("_")) for pad in window.group(2).split("x")] \
      if window.group(2) else [(0, 0)] * len(sizes)
  taps = 1.0
  for d, (w, (lo, _)) in enumerate(zip(sizes, pads)):
    n_in, n_out = lhs[lhs_labels.index(str(d))], out[out_labels.index(str(d))]
    hits = sum(max(0, min(w, n_in + lo - o) - max(0, lo - o)) for o in range(n_out))
    taps *= hits / n_out
  return taps


def matmul_flops(computations, ins: Instruction, body: list[Instruction] | None = None) -> float:
  """FLOPs of the dots and convolutions `ins` runs (inside its fusion, nested fusions too)
  and of a Pallas kernel's cost estimate."""
  if ins.opcode == "fusion":
    called = computations.get(ins.attribute("calls"), [])
    return sum(matmul_flops(computations, i, called) for i in called)
  if ins.opcode in ("convolution", "dot"):
    shapes = {i.name: i.shape for i in (body or [])}
    lhs = dims(shapes.get(operands(ins)[0], "")) if operands(ins) else []
    out = math.prod(dims(ins.shape))
    if ins.opcode == "dot":
      m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.text)
      contracted = [int(d) for d in (m.group(1).split(",") if m else []) if d]
      return 2.0 * out * math.prod(lhs[d] for d in contracted if d < len(lhs))
    m = re.search(r"dim_labels=(\w+)_\w+->(\w+)", ins.text)
    k = lhs[m.group(1).index("f")] if m and "f" in m.group(1) and lhs else 1
    window = re.search(r"window=\{size=([\dx]+)(?: pad=([\d_x]+))?", ins.text)
    if window and m and lhs:
      k *= _taps(window, m.group(1), m.group(2), lhs, dims(ins.shape))
    groups = re.search(r"feature_group_count=(\d+)", ins.text)
    return 2.0 * out * k / (int(groups.group(1)) if groups else 1)
  m = re.search(r'"cost_estimate":\{"flops":"(\d+)"', ins.text)
  return float(m.group(1)) if m and "tpu_custom_call" in ins.text else 0.0


@dataclasses.dataclass
class Cost:
  """A compiled step's estimated seconds by component, and what the estimate could not see."""
  seconds: dict[str, float]                     # component -> estimated seconds (exposed)
  collective_bytes: dict[str, float]            # collective kind -> bytes one chip sends
  collectives: collections.Counter              # (kind, "sync" | "async") -> count
  flops: float = 0.0                            # matmul and kernel FLOPs, loops unrolled
  component_flops: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(float))
  overlapped_seconds: float = 0.0               # collective time hidden behind compute
  unestimated: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  @property
  def total(self) -> float:
    return sum(self.seconds.values())


def estimate(text: str, generation: str, component_of: Callable[[str], str],
             loop_trips: Callable[[Instruction], int] | None = None) -> Cost:
  """The estimated step time of compiled module `text` for a `generation` chip, by
  component (`component_of(op_name)`). `loop_trips` gives a data-dependent loop's trip
  count (default 1)."""
  computations, entry = parse(text)
  n_devices = partitions(text)
  clock, peak, hbm = CLOCK_HZ[generation], PEAK_FLOPS[generation], HBM_BYTES_PER_S[generation]
  ici = ICI_BYTES_PER_S[generation]
  cost = Cost(collections.defaultdict(float), collections.defaultdict(float), collections.Counter())

  def compute_seconds(ins: Instruction) -> float | None:
    cycles = ins.cycles
    if cycles is not None and cycles < _SENTINEL:
      return cycles / clock
    m = re.search(r'"cost_estimate":\{"flops":"(\d+)","transcendentals":"\d+","bytes_accessed":"(\d+)"',
                  ins.text)
    if m:
      return max(int(m.group(1)) / peak, int(m.group(2)) / hbm)
    return None

  # Each asynchronous collective's start -> the estimated compute scheduled before its done
  # (None: its done is in a later loop iteration), found in one pass per computation.
  hidden_behind: dict[str, float | None] = {}
  for body in computations.values():
    open_starts: dict[str, float] = {}  # start name -> compute seen since it
    for ins in body:
      if ins.is_async_done:  # the first done naming a start closes it
        args = ins.text.split("=", 1)[1]
        for name in [n for n in open_starts if re.search(rf"%{re.escape(n)}\b", args)]:
          hidden_behind[name] = open_starts.pop(name)
      seconds = compute_seconds(ins) or 0.0
      for name in open_starts:
        open_starts[name] += seconds
      if ins.is_async_start and ins.collective:
        open_starts[ins.name] = 0.0
    hidden_behind.update(dict.fromkeys(open_starts))

  for ins, times in walk(computations, entry, 1, loop_trips):
    kind = ins.collective
    component = component_of(ins.op_name)
    if kind is not None:
      sent = wire_bytes(ins, kind, n_devices)
      cost.collective_bytes[kind] += sent * times
      seconds = sent / (ici / 2) if ici else 0.0
      if ins.name in hidden_behind:  # asynchronous: hidden behind what runs until its done
        window = hidden_behind[ins.name]
        hidden = seconds if window is None else min(seconds, window)
        cost.collectives[(kind, "async")] += times
        cost.overlapped_seconds += hidden * times
        seconds -= hidden
      else:
        cost.collectives[(kind, "sync")] += times
      if not ici:
        cost.unestimated[f"{kind} (no ICI bandwidth for {generation})"] += times
      cost.seconds["exchange" if kind == "all-to-all" else "collectives"] += seconds * times
      continue
    flops = matmul_flops(computations, ins) * times
    cost.flops += flops
    if flops:
      cost.component_flops[component] += flops
    seconds = compute_seconds(ins)
    if seconds is not None:
      cost.seconds[component] += seconds * times
    elif ins.cycles is not None or "tpu_custom_call" in ins.text:
      what = "SparseCore offload" if ins.cycles is not None else f"kernel without estimate in {component}"
      cost.unestimated[what] += times
  cost.seconds = dict(cost.seconds)
  cost.collective_bytes = dict(cost.collective_bytes)
  return cost


def scope_component(components: tuple[str, ...]) -> Callable[[str], str]:
  """component_of for estimate(): the innermost of `components` in `op_name`, else 'other'."""
  def component_of(op_name: str) -> str:
    # Autodiff wraps a scope's name: jvp(attention), transpose(jvp(lm_head_loss)).
    names = re.findall(r"\w+", op_name)
    return next((n for n in reversed(names) if n in components), "other")
  return component_of
