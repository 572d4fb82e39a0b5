"""Wall-clock timing and compiled memory shared by the benchmark scripts, and paths timed in
turns against a limit (bench_moe, bench_routers)."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


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


@dataclasses.dataclass
class Row:
  path: str
  fwd_ms: float
  fwd_bwd_ms: float
  peak_temp_bytes: int
  ratio_to_dense: float = float("nan")
  default: bool = False


class Path(NamedTuple):
  name: str
  layer: Callable  # (*args) -> [T, d]
  args: tuple
  default: bool = False


class Jitted(NamedTuple):
  fwd: Callable
  fwd_args: tuple
  grad: Callable
  grad_args: tuple


def _compiled(path: Path) -> Jitted:
  """Forward, and forward+backward w.r.t. every input. The output cotangent is an argument,
  as in training: a constant one would let XLA fold it into the backward pass."""
  cot = 1e-3 * jnp.ones(jax.eval_shape(path.layer, *path.args).shape, jnp.float32)
  grad = jax.jit(jax.grad(lambda cot, *a: jnp.sum(path.layer(*a) * cot),
                          argnums=tuple(range(1, len(path.args) + 1))))
  return Jitted(jax.jit(path.layer), path.args, grad, (cot, *path.args))


def _time_round_robin(compiled, reps: int) -> list[tuple[list[float], list[float]]]:
  """Forward and forward+backward times of each compiled path, the paths taking turns within
  every repetition, so a slow spell of the machine hits them alike."""
  for fwd, fwd_args, grad, grad_args in compiled:  # compile and warm up
    jax.block_until_ready((fwd(*fwd_args), grad(*grad_args)))
  times = [([], []) for _ in compiled]
  for _ in range(reps):
    for (fwd, fwd_args, grad, grad_args), (t_fwd, t_grad) in zip(compiled, times):
      t_fwd.append(time_ms(fwd, fwd_args, 1, warmup=False))
      t_grad.append(time_ms(grad, grad_args, 1, warmup=False))
  return times


def measure(limit: Path, paths: list[Path], reps: int) -> list[Row]:
  """Rows for the limit and each path; every path is timed in turns with the limit, and
  its ratio_to_dense is its median forward+backward time over the limit's in that window
  (so one path's huge buffers, e.g. ragged_dot's on CPU, do not slow the others' windows)."""
  limit_compiled = _compiled(limit)
  limit_times, rows = ([], []), []
  for path in paths:
    compiled = _compiled(path)
    (l_fwd, l_grad), (t_fwd, t_grad) = _time_round_robin([limit_compiled, compiled], reps)
    limit_times[0].extend(l_fwd)
    limit_times[1].extend(l_grad)
    rows.append(Row(path.name, statistics.median(t_fwd), statistics.median(t_grad),
                    temp_bytes(compiled.grad, compiled.grad_args),
                    statistics.median(t_grad) / statistics.median(l_grad), path.default))
  limit_row = Row(limit.name, statistics.median(limit_times[0]), statistics.median(limit_times[1]),
                  temp_bytes(limit_compiled.grad, limit_compiled.grad_args), 1.0)
  return [limit_row, *rows]


def format_table(rows: list[Row]) -> str:
  lines = ["| path | fwd ms | fwd+bwd ms | peak temp MiB | ratio_to_dense | default |",
           "|---|---:|---:|---:|---:|---|"]
  for r in rows:
    temp = f"{r.peak_temp_bytes / 2**20:.1f}" if r.peak_temp_bytes >= 0 else "-"
    fwd = f"{r.fwd_ms:.1f}" if r.fwd_ms == r.fwd_ms else "-"
    lines.append(f"| {r.path} | {fwd} | {r.fwd_bwd_ms:.1f} | {temp} | {r.ratio_to_dense:.2f} | "
                 f"{'yes' if r.default else ''} |")
  return "\n".join(lines)


def write_json(rows: list[Row], path: str) -> None:
  """The rows as a JSON list of {path, fwd_ms, fwd_bwd_ms, peak_temp_bytes, ratio_to_dense,
  default}; times in milliseconds, ratio_to_dense of forward+backward."""
  with open(path, "w") as fh:
    json.dump([{"path": r.path, "fwd_ms": r.fwd_ms, "fwd_bwd_ms": r.fwd_bwd_ms,
                "peak_temp_bytes": r.peak_temp_bytes, "ratio_to_dense": r.ratio_to_dense,
                "default": r.default} for r in rows], fh, indent=2)
