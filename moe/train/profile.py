"""Profiling a range of training steps with jax.profiler (`--profile_steps=A:B`).

The trace lands in workdir/profile/plugins/profile/<time>/ (`*.xplane.pb` for TensorBoard's
profile tab, `*.trace.json.gz` for Perfetto / chrome://tracing).
"""

from __future__ import annotations

import os

import jax


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


class StepProfiler:
  """Starts a trace before step `first` runs and stops it once step `last` has finished."""

  def __init__(self, workdir: str, steps: tuple[int, int] | None):
    self.directory = os.path.join(workdir, "profile")
    self.steps = steps
    self.active = False

  def before(self, step: int) -> None:
    if self.steps and step == self.steps[0]:
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
