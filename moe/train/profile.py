"""Profiling a range of training steps with jax.profiler (`--profile_steps=A:B`), and where
their time went.

The trace lands in workdir/profile/plugins/profile/<time>/ (`*.xplane.pb` for TensorBoard's
profile tab, `*.trace.json.gz` for Perfetto / chrome://tracing), and the compiled train
step's module text in workdir/profile/train_step.hlo.txt. `breakdown` reads both: every
kernel the trace shows (XLA:CPU names each by its module and instruction) is charged to the
model's named scope of that instruction (moe.train.plan.COMPONENTS), and the time inside a
step when no kernel runs is the framework's.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
from typing import Any, Callable

import jax

from moe.parallel import hlo_text

MODULE_FILE = "train_step.hlo.txt"
# Instructions whose kernels contain others' (loops): their time is their body's.
_CONTAINERS = ("while", "conditional", "call")


def parse_steps(text: str) -> tuple[int, int]:
  """'A:B' -> (A, B): trace steps A..B inclusive, as the progress line numbers them (from 1)."""
  first, sep, last = text.partition(":")
  try:
    steps = (int(first), int(last if sep else first))
  except ValueError:
    raise ValueError(f"profile steps {text!r}: write FIRST:LAST, e.g. 10:12") from None
  if not 1 <= steps[0] <= steps[1]:
    raise ValueError(f"profile steps {text!r}: need 1 <= FIRST <= LAST")
  return steps


def _abstract(x: Any) -> Any:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)) \
      if hasattr(x, "shape") else x


class StepProfiler:
  """Starts a trace before step `first` runs and stops it once step `last` has finished;
  then writes the step's compiled module text beside the trace."""

  def __init__(self, workdir: str, steps: tuple[int, int] | None):
    self.directory = os.path.join(workdir, "profile")
    self.steps = steps
    self.active = False
    self.step_fn: tuple[Callable, tuple] | None = None

  def before(self, step: int, fn: Callable | None = None, args: tuple = ()) -> None:
    """fn(*args) is the step about to run (jitted): its module names the trace's kernels."""
    if self.steps and step == self.steps[0]:
      if fn is not None:  # shapes only: the step may donate its inputs
        self.step_fn = (fn, jax.tree.map(_abstract, args))
      jax.block_until_ready(args)  # the steps before, still running, stay out of the trace
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, outputs) -> None:
    if self.active and step >= self.steps[1]:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      if self.step_fn is not None:  # compiled again from shapes: the same module, deterministic
        fn, args = self.step_fn
        # Not from the persistent cache: its key ignores the op_name metadata, so a cached
        # executable may carry the scopes of older code (instruction names do not change).
        cached = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        try:
          text = fn.lower(*args).compile().as_text()
        finally:
          jax.config.update("jax_enable_compilation_cache", cached)
        with open(os.path.join(self.directory, MODULE_FILE), "w") as f:
          f.write(text)


@dataclasses.dataclass
class Breakdown:
  """Per step, averaged over the traced executions of the train step's module."""
  steps: int
  wall_s: float                  # first kernel start to last kernel end, per step
  components: dict[str, float]   # scope -> seconds of its kernels (summed, if concurrent)
  between_kernels_s: float       # inside the step, no kernel running: the framework's
  between_steps_s: float         # from one step's last kernel to the next one's first


def _union_seconds(spans: list[tuple[float, float]]) -> float:
  total, end = 0.0, float("-inf")
  for a, b in sorted(spans):
    if b > end:
      total += b - max(a, end)
      end = b
  return total


def breakdown(directory: str, component_of: Callable[[str], str]) -> Breakdown:
  """Where the traced train steps' time went, from the newest trace in `directory`
  (workdir/profile) and the module text StepProfiler wrote there."""
  traces = sorted(glob.glob(os.path.join(directory, "plugins", "profile", "*", "*.trace.json.gz")))
  module_path = os.path.join(directory, MODULE_FILE)
  if not traces or not os.path.exists(module_path):
    raise FileNotFoundError(f"{directory}: no trace with {MODULE_FILE} beside it; train with "
                            f"--profile_steps=FIRST:LAST first")
  text = open(module_path).read()
  module = re.match(r"HloModule ([\w.\-]+)", text).group(1)
  computations, _ = hlo_text.parse(text)
  kind = {i.name: (i.opcode, component_of(i.op_name)) for ins in computations.values() for i in ins}
  with gzip.open(traces[-1]) as f:
    events = json.load(f)["traceEvents"]
  runs: dict[str, list[tuple[float, float, str]]] = {}
  for e in events:
    args = e.get("args", {})
    if e.get("ph") != "X" or args.get("hlo_module") != module or args.get("hlo_op") not in kind:
      continue
    opcode, component = kind[args["hlo_op"]]
    if opcode not in _CONTAINERS:
      runs.setdefault(args.get("run_id", ""), []).append((e["ts"], e["ts"] + e["dur"], component))
  if not runs:
    raise ValueError(f"{traces[-1]}: no kernel of module {module}")
  n = len(runs)
  components: dict[str, float] = {}
  spans, idle = [], 0.0
  for kernels in runs.values():
    start, end = min(k[0] for k in kernels), max(k[1] for k in kernels)
    spans.append((start, end))
    idle += (end - start) - _union_seconds([(a, b) for a, b, _ in kernels])
    for a, b, c in kernels:
      components[c] = components.get(c, 0.0) + (b - a)
  spans.sort()
  gaps = [b[0] - a[1] for a, b in zip(spans, spans[1:])]
  us = 1e-6
  return Breakdown(n, sum(b - a for a, b in spans) / n * us,
                   {c: t / n * us for c, t in sorted(components.items(), key=lambda kv: -kv[1])},
                   idle / n * us, (sum(gaps) / len(gaps) if gaps else 0.0) * us)
