"""Wall-clock timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import jax


def time_ms(fn, args, reps: int, warmup: bool = True) -> float:
  """Median milliseconds of fn(*args) over reps calls, after one warm-up (compile) call."""
  if warmup:
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3
