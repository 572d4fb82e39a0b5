"""Training speed from steps known to be complete, not from dispatch.

Steps run asynchronously: the host queues step k+1 while the device still computes step k,
so host time between two log points measures dispatch, not work (a tiny model logged 24k,
1.9k and 79k tokens/s at consecutive steps). `Throughput.measure` blocks on the logged step's
result and times the interval since the last measured step's completion; work that is not
training (evaluation, checkpoint saves) runs inside `excluded`, which first waits for the
steps already queued (their time counts) and then leaves its own time out.

The first interval of a process includes compiling the step.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import jax

# bf16 dense peak TFLOP/s per chip (vendors' figures), by the start of jax's device_kind.
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
               "TPU v5": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0,
               "NVIDIA H100": 989.0, "NVIDIA H200": 989.0}


def peak_tflops(device_kind: str) -> float | None:
  """The chip's bf16 peak, or None where unknown (CPUs)."""
  for prefix in sorted(PEAK_TFLOPS, key=len, reverse=True):
    if device_kind.startswith(prefix):
      return PEAK_TFLOPS[prefix]
  return None


class Throughput:
  """step_time_s, tokens_per_sec, model TFLOP/s per device (and MFU where the chip's peak
  is known) over the steps since the last measure."""

  def __init__(self, step: int, tokens_per_step: int, flops_per_token: float, n_devices: int,
               peak: float | None = None):
    self.step, self.t, self.paused = step, time.perf_counter(), 0.0
    self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
    self.n_devices, self.peak = n_devices, peak

  def measure(self, step: int, done: Any) -> dict[str, float]:
    """Blocks until `done` (an output of step `step`) is ready; the speed since the last."""
    jax.block_until_ready(done)
    now = time.perf_counter()
    seconds = max(now - self.t - self.paused, 1e-9) / max(step - self.step, 1)
    self.step, self.t, self.paused = step, now, 0.0
    tokens_per_sec = self.tokens_per_step / seconds
    tflops = tokens_per_sec * self.flops_per_token / self.n_devices / 1e12
    out = {"step_time_s": seconds, "tokens_per_sec": tokens_per_sec,
           "tflops_per_sec_per_device": tflops}
    if self.peak:
      out["mfu"] = tflops / self.peak
    return out

  @contextlib.contextmanager
  def excluded(self, queued: Any) -> Iterator[None]:
    """Time inside is left out of the next measure; `queued` (the latest step's output) is
    waited for first, so the steps before it count as training."""
    jax.block_until_ready(queued)
    start = time.perf_counter()
    try:
      yield
    finally:
      self.paused += time.perf_counter() - start
