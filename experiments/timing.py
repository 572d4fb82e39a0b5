"""Wall-clock timing and compiled memory shared by the benchmark scripts."""

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


def median_of(reps: int, fn):
  """(median wall seconds, last result) of `reps` calls of fn(), which returns host values."""
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), out


def temp_bytes(fn, args) -> int:
  """Temporary bytes of jitted fn's compiled executable for args (-1 where XLA reports none)."""
  analysis = fn.lower(*args).compile().memory_analysis()
  return int(getattr(analysis, "temp_size_in_bytes", -1)) if analysis is not None else -1
