"""Reading a compiled module's text (`compiled.as_text()`): its computations in schedule
order (`is_scheduled=true`), each instruction's shape, op_name, estimated cycles and
collective, shapes' bytes, collectives' replica groups, and loops' trip counts. The cost
model (moe.parallel.compiled_cost) and the cross-slice check (moe.parallel.slices) read it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Iterator

import numpy as np

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
             "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\(")
_COMPUTATION = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{$")


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  shape: str      # the result's shape text, e.g. bf16[8,1024]{1,0} or a tuple
  text: str       # the whole instruction, continuation lines included

  @property
  def op_name(self) -> str:
    m = re.search(r'op_name="([^"]*)"', self.text)
    return m.group(1) if m else ""

  @property
  def cycles(self) -> int | None:
    m = re.search(r'"estimated_cycles":"(\d+)"', self.text)
    return int(m.group(1)) if m else None

  def attribute(self, key: str) -> str | None:  # calls=, body=, condition=, to_apply=
    m = re.search(rf"\b{key}=%([\w.\-]+)", self.text)
    return m.group(1) if m else None

  @property
  def is_async_start(self) -> bool:
    return self.opcode.endswith("-start") or self.name.startswith("async-collective-start")

  @property
  def is_async_done(self) -> bool:
    return self.opcode.endswith("-done") or self.name.startswith("async-collective-done")

  @property
  def collective(self) -> str | None:
    """The collective this instruction starts or runs (None for other instructions)."""
    base = self.opcode.removesuffix("-start")
    if base in COLLECTIVES:
      return base
    m = re.search(r'async_collective_name="([a-z\-]+?)(?:-start)?"', self.text)
    if self.name.startswith("async-collective-start") and m:
      return m.group(1)
    if "all-reduce-scatter" in self.text and self.opcode == "fusion":
      return "reduce-scatter"
    return None


def parse(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """({computation: instructions in schedule order}, the entry computation's name)."""
  computations: dict[str, list[Instruction]] = {}
  current, entry = None, ""
  for line in text.splitlines():
    if current is None:
      m = _COMPUTATION.match(line)
      if m:
        current = m.group(2)
        computations[current] = []
        entry = current if m.group(1) else entry
      continue
    if line == "}":  # only a bare brace ends one: kernels' metadata holds lines starting "}}"
      current = None
      continue
    m = _INSTRUCTION.match(line)
    if m:
      computations[current].append(Instruction(m.group(1), m.group(3), m.group(2), line))
    elif computations[current]:
      computations[current][-1].text += "\n" + line
  return computations, entry


def shape_bytes(shape: str) -> int:
  return sum(math.prod(int(d) for d in dims.split(",") if d) * _ITEMSIZE.get(dtype, 0)
             for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape))


def partitions(text: str) -> int:
  """The devices a module is SPMD over (`num_partitions`; one slice's chips)."""
  m = re.search(r"num_partitions=(\d+)", text)
  return int(m.group(1)) if m else 1


def replica_groups(ins: Instruction, n_devices: int) -> list[list[int]] | None:
  """A collective's device groups, from any spelling the module uses; None for a spelling
  not read here."""
  text = ins.text
  m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", text)
  if m:
    groups = [[int(d) for d in g.split(",") if d] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    return groups or [list(range(n_devices))]  # {}: one group of every device
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
  if m:  # iota: reshape(arange, dims).transpose(perm).reshape(groups, size)
    shape = [int(d) for d in m.group(3).split(",")]
    ids = np.arange(math.prod(shape)).reshape(shape)
    if m.group(4):
      ids = ids.transpose([int(p) for p in m.group(4).split(",")])
    return ids.reshape(int(m.group(1)), int(m.group(2))).tolist()
  m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? "
                r"\{([^}]*)\}", text)
  if m:  # named axes, mesh['axis_0'=32,'axis_1'=8] {'axis_0'}: one group per other index
    sizes = {a: int(n) for a, n in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
    over = re.findall(r"'(\w+)'", m.group(4))
    if set(over) <= set(sizes):
      ids = np.arange(math.prod(sizes.values()))
      if m.group(2):  # device_ids=([32,8]T(1,0)): the mesh's devices, an iota permuted
        ids = ids.reshape([int(d) for d in m.group(2).split(",")])
        ids = ids.transpose([int(p) for p in m.group(3).split(",")]) if m.group(3) else ids
      ids = ids.reshape(list(sizes.values()))
      names = list(sizes)
      ids = np.moveaxis(ids, [names.index(a) for a in over], range(-len(over), 0))
      return ids.reshape(-1, math.prod(sizes[a] for a in over)).tolist()
  return None


def group_size(ins: Instruction, n_devices: int) -> int:
  """Devices in each of the collective's groups (every device where the spelling is not
  read)."""
  groups = replica_groups(ins, n_devices)
  return len(groups[0]) if groups else n_devices


def dims(shape: str) -> list[int]:
  m = re.search(r"\[([\d,]*)\]", shape)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def operands(ins: Instruction) -> list[str]:
  m = re.search(rf"{re.escape(ins.opcode)}\(([^)]*)\)", ins.text)
  return re.findall(r"%([\w.\-]+)", m.group(1)) if m else []


def trip_count(computations, condition: str | None) -> int:
  """A counted loop's bound: the constant its condition's `counter < constant` compares
  with; 1 where the bound is data-dependent (say, the dropless rounds' count)."""
  body = computations.get(condition, [])
  constants = {i.name: int(m.group(1)) for i in body if i.opcode == "constant"
               for m in [re.search(r"constant\((-?\d+)\)", i.text)] if m}
  compare = next((i for i in reversed(body) if i.opcode == "compare"), None)
  if compare is None or "direction=LT" not in compare.text:
    return 1
  args = operands(compare)
  return constants.get(args[1], 1) if len(args) == 2 else 1


def while_trips(computations, scope: list[Instruction], loop: Instruction) -> int:
  """Trips of while `loop` (an instruction of `scope`): its condition's bound less the
  counter's first value. The compiler peels loops, so a 61-layer scan may start at 1 with
  one layer run before it; 1 where the bound is data-dependent."""
  condition = computations.get(loop.attribute("condition"), [])
  bound = trip_count(computations, loop.attribute("condition"))
  counter = next((re.search(r"index=(\d+)", i.text) for i in condition
                  if i.opcode == "get-tuple-element"), None)
  by_name = {i.name: i for i in scope}
  init = by_name.get(next(iter(operands(loop)), ""))
  if bound == 1 or counter is None or init is None or init.opcode != "tuple":
    return bound
  args = operands(init)
  k = int(counter.group(1))
  init = by_name.get(args[k]) if k < len(args) else None
  while init is not None and init.opcode in ("copy", "bitcast"):
    init = by_name.get(next(iter(operands(init)), ""))
  start = re.search(r"constant\((-?\d+)\)", init.text) if init is not None else None
  return max(bound - int(start.group(1)), 0) if start and init.opcode == "constant" else bound


def walk(computations, name: str, times: int = 1,
         loop_trips: Callable[[Instruction], int] | None = None) -> Iterator[tuple[Instruction, int]]:
  """Every instruction reached from computation `name` with the trips of the loops around
  it; `loop_trips` gives a data-dependent loop's trips (default 1)."""
  scope = computations.get(name, [])
  for ins in scope:
    if ins.opcode == "while":
      trips = while_trips(computations, scope, ins)
      if trips == 1 and loop_trips is not None:
        trips = loop_trips(ins)
      yield from walk(computations, ins.attribute("body"), times * trips, loop_trips)
    elif ins.opcode in ("call", "conditional") and ins.attribute("to_apply"):
      yield from walk(computations, ins.attribute("to_apply"), times, loop_trips)
    else:
      yield ins, times
