"""What crosses slices in a compiled multi-slice step.

A mesh over several slices (moe.parallel.mesh: data spans the slices) compiles to a module
that is SPMD over one slice (`num_partitions` = one slice's chips): its collectives
(all-to-all, all-gather, reduce-scatter, all-reduce, collective-permute) run over the
slice's ICI, their replica groups naming devices of that slice only, and what crosses the
data-centre network (DCN) is `send`/`recv` pairs handed to the megascale runtime
(`is_host_transfer=true`, `_xla_megascale_transfer_type="ALL_REDUCE"` ...). So:

- `cross_slice(text)`: those transfers, with the bytes one chip sends and receives per step
  (loops unrolled by their trip counts);
- `collective_groups(text)`: every in-slice collective's device groups, to check that
  they stay inside one slice (every id below `num_partitions`) and span the axes expected.
"""

from __future__ import annotations

import collections
import dataclasses
import re

from moe.parallel.hlo_text import (COLLECTIVES, Instruction, parse, partitions, replica_groups,
                                   shape_bytes, walk)

_TYPE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_REDUCE = re.compile(r'_xla_megascale_reduce_operation="(\w+)"')


@dataclasses.dataclass(frozen=True)
class Transfer:
  """One megascale send or recv: its data's bytes, times the loops around it."""
  name: str
  direction: str   # "send" | "recv"
  kind: str        # _xla_megascale_transfer_type: ALL_REDUCE, ALL_GATHER, ...
  reduce: str      # _xla_megascale_reduce_operation (SUM, MAX) or ""
  bytes: int       # of the data sent or received, once
  times: int       # loop trips around it


@dataclasses.dataclass(frozen=True)
class CrossSlice:
  transfers: tuple[Transfer, ...]

  def _total(self, direction: str) -> int:
    return sum(t.bytes * t.times for t in self.transfers if t.direction == direction)

  @property
  def sent_bytes(self) -> int:
    """Bytes one chip sends to other slices per step."""
    return self._total("send")

  @property
  def received_bytes(self) -> int:
    return self._total("recv")

  @property
  def kinds(self) -> dict[str, int]:
    """{transfer type: bytes one chip sends per step}."""
    out: dict[str, int] = collections.defaultdict(int)
    for t in self.transfers:
      if t.direction == "send":
        out[t.kind] += t.bytes * t.times
    return dict(out)


def cross_slice(text: str) -> CrossSlice:
  """The megascale (DCN) transfers of compiled module `text`; none on one slice."""
  computations, entry = parse(text)
  transfers = []
  for ins, times in walk(computations, entry):
    kind = _TYPE.search(ins.text)
    if ins.opcode not in ("send", "recv") or kind is None:
      continue
    data = re.match(r"\(?\s*([a-z]+\d*\[[\d,]*\])", ins.shape)  # (data, u32[], token[])
    reduce = _REDUCE.search(ins.text)
    transfers.append(Transfer(ins.name, ins.opcode, kind.group(1), reduce.group(1) if reduce else "",
                              shape_bytes(data.group(1)) if data else 0, times))
  return CrossSlice(tuple(transfers))


def _groups(ins: Instruction, n_devices: int) -> list[list[int]] | None:
  m = re.search(r"source_target_pairs=\{([\d,{}]*)\}", ins.text)
  if m:
    return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
  return replica_groups(ins, n_devices)


def collective_groups(text: str) -> list[tuple[str, str, list[list[int]] | None]]:
  """(instruction name, collective, its device groups) for every in-slice collective of
  compiled module `text` (collective-permute: its source-target pairs; None: groups in a
  spelling not read here). Device ids are the module's partitions, 0 .. num_partitions-1."""
  computations, _ = parse(text)
  n_devices = partitions(text)
  out = []
  for instructions in computations.values():
    for ins in instructions:
      kind = ins.collective
      if kind in COLLECTIVES and not ins.opcode.endswith("-done"):
        groups = _groups(ins, n_devices)
        if groups is None and ins.opcode == "fusion":  # a collective fusion: its body's groups
          inner = [i for i in computations.get(ins.attribute("calls"), []) if i.collective]
          groups = _groups(inner[0], n_devices) if inner else None
        out.append((ins.name, kind, groups))
  return out
