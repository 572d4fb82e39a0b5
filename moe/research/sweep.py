"""Sweeps: one base config, named variants and/or a product of gin overrides, each run in
its own sub-workdir as a separate process (moe.research.sweep_results collects the table).

A sweep file is JSON:

    {
      "base": ["experiments/configs/cpu/base.gin"],        # gin files for every variant
      "bindings": ["TrainConfig.steps = 250"],              # gin bindings for every variant
      "variants": {                                         # named variants (optional) ...
        "gshard": {"gin_files": ["experiments/configs/cpu/gshard.gin"]},
        "finer": {"gin_files": ["..."], "bindings": ["model_config.n_layers = 2"]}
      },
      "product": {                                          # ... crossed with a product (optional)
        "model_config.expert_balance_alpha": [0.001, 0.01]
      }
    }

Variant names become sub-workdir names: the variant key, then NAME=VALUE for each product
axis (the binding's last component), joined by ','. A variant's model is its name without
the SEED=... part (the gin macro SEED sets initialisation, routing noise and data order).

Two optional keys decide and tune the comparison:

      "comparisons": [["deepseekmoe", "gshard"], ...],     # models A, B: A - B is reported
                     # [A, B, "max_over_mean_load"]: another of the results' per-run metrics
      "lr_grid": {"values": [1e-3, 2e-3, 3e-3, 6e-3],      # learning rates to try ...
                  "seeds": [0, 1],                          # ... at these seeds ...
                  "bindings": ["TrainConfig.steps = 100"],  # ... on this (short) budget ...
                  "widen": 2}                               # ... adding up to 2 rates past an edge

comparisons: pairs of models whose per-seed differences, t and bootstrap intervals and
Holm-corrected decisions the results report (moe.research.comparisons). lr_grid: before the
sweep's runs, every model runs at each rate and seed with these bindings added (in
WORKDIR/lr_search/), and its runs then use the rate with the lowest mean final validation
loss (moe.research.lr_search).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import math
import os
import queue
import re
import shlex
import subprocess
import sys
from typing import Any

import numpy as np

from moe.train.run_files import RESULT

_KEYS = {"base", "bindings", "variants", "product", "comparisons", "lr_grid"}
SEED_KEY = "SEED"
LR_BINDING = "TrainConfig.learning_rate"


class SweepError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  gin_files: tuple[str, ...]
  bindings: tuple[str, ...]
  args: tuple[str, ...] = ()  # further flags of experiments.train (e.g. --mesh=...)


def with_overrides(variants: list[Variant], gin_files=(), bindings=(), args=()) -> list[Variant]:
  """Every variant with sweep-wide gin files and bindings after its own (so they win over
  the sweep file's) and further training flags."""
  return [dataclasses.replace(v, gin_files=v.gin_files + tuple(gin_files),
                              bindings=v.bindings + tuple(bindings), args=v.args + tuple(args))
          for v in variants]


@dataclasses.dataclass(frozen=True)
class LrGrid:
  values: tuple[float, ...]
  seeds: tuple[int, ...]
  bindings: tuple[str, ...] = ()
  widen: int = 0  # rates to add past the edge, one at a time, while a model's best lies on it


@dataclasses.dataclass(frozen=True)
class Sweep:
  variants: list[Variant]
  comparisons: tuple[tuple[str, ...], ...] = ()  # (A, B) or (A, B, metric)
  lr_grid: LrGrid | None = None


def model_of(name: str, seed_key: str = SEED_KEY) -> tuple[str, str | None]:
  """A variant name -> (its model: the name without the seed part; the seed, None if none)."""
  parts = name.split(",")
  seeds = [p[len(seed_key) + 1:] for p in parts if p.startswith(seed_key + "=")]
  return ",".join(p for p in parts if not p.startswith(seed_key + "=")), (seeds[0] if seeds else None)


def binds_name(binding: str, name: str) -> bool:
  """Whether a gin binding 'NAME = VALUE' binds `name`."""
  return re.match(rf"\s*{re.escape(name)}\s*=", binding) is not None


def load_sweep(path: str) -> list[Variant]:
  """The variants of the sweep file at `path`, checked."""
  return load_sweep_spec(path).variants


def load_sweep_spec(path: str) -> Sweep:
  """The sweep file at `path`, checked: its variants, declared comparisons and learning-rate
  grid."""
  try:
    with open(path) as f:
      spec = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise SweepError(f"cannot read sweep file {path!r}: {e}") from e
  if not isinstance(spec, dict) or set(spec) - _KEYS:
    raise SweepError(f"sweep file {path!r}: expected a JSON object with keys from {sorted(_KEYS)}, "
                     f"got {sorted(spec) if isinstance(spec, dict) else type(spec).__name__}")
  base = tuple(_strings(spec.get("base", []), path, "base"))
  common = tuple(_strings(spec.get("bindings", []), path, "bindings"))
  named = spec.get("variants") or {"": {}}
  product = spec.get("product") or {}
  if not isinstance(named, dict) or not isinstance(product, dict):
    raise SweepError(f"sweep file {path!r}: 'variants' and 'product' must be JSON objects")
  for key, values in product.items():
    if not isinstance(values, list) or not values:
      raise SweepError(f"sweep file {path!r}: product axis {key!r} needs a non-empty list of values")
  axes = list(product.items())
  out = []
  for vname, v in named.items():
    if not isinstance(v, dict) or set(v) - {"gin_files", "bindings"}:
      raise SweepError(f"sweep file {path!r}: variant {vname!r} must be an object with "
                       f"'gin_files' and/or 'bindings'")
    files = base + tuple(_strings(v.get("gin_files", []), path, f"{vname}.gin_files"))
    binds = common + tuple(_strings(v.get("bindings", []), path, f"{vname}.bindings"))
    for values in itertools.product(*[vals for _, vals in axes]):
      extra = tuple(f"{k} = {_gin_value(x)}" for (k, _), x in zip(axes, values))
      parts = ([vname] if vname else []) + [f"{k.split('.')[-1]}={x}" for (k, _), x in zip(axes, values)]
      out.append(Variant(",".join(parts) or "run", files, binds + extra))
  names = [v.name for v in out]
  if len(set(names)) != len(names):
    raise SweepError(f"sweep file {path!r}: variant names repeat: {names}")
  return Sweep(out, _comparisons(spec.get("comparisons", []), out, path),
               _lr_grid(spec["lr_grid"], path) if "lr_grid" in spec else None)


METRICS = ("eval_loss", "max_over_mean_load", "train_max_over_mean_load", "late_train_max_over_mean_load",
           "gate_mass", "router_entropy", "dropped_fraction")


def _comparisons(value: Any, variants: list[Variant], path: str) -> tuple[tuple[str, ...], ...]:
  models = sorted({model_of(v.name)[0] for v in variants})
  if not isinstance(value, list):
    raise SweepError(f"sweep file {path!r}: 'comparisons' must be a list of [model A, model B] pairs "
                     f"(optionally [A, B, metric])")
  out = []
  for pair in value:
    if (not isinstance(pair, list) or len(pair) not in (2, 3) or not all(isinstance(x, str) for x in pair)
        or pair[0] == pair[1]):
      raise SweepError(f"sweep file {path!r}: comparison {pair!r} must be a pair of two different "
                       f"model names, optionally with a metric")
    if len(pair) == 3 and pair[2] not in METRICS:
      raise SweepError(f"sweep file {path!r}: comparison {pair!r}: metric {pair[2]!r} is not one of {list(METRICS)}")
    for name in pair[:2]:
      if name not in models:
        raise SweepError(f"sweep file {path!r}: comparison {pair!r} names {name!r}, which is not a "
                         f"model of the sweep; its models: {models}")
    out.append(tuple(pair) if len(pair) == 3 and pair[2] != "eval_loss" else tuple(pair[:2]))
  if len(set(out)) != len(out):
    raise SweepError(f"sweep file {path!r}: a comparison repeats: {value}")
  return tuple(out)


def _lr_grid(value: Any, path: str) -> LrGrid:
  if not isinstance(value, dict) or set(value) - {"values", "seeds", "bindings", "widen"} or "values" not in value:
    raise SweepError(f"sweep file {path!r}: 'lr_grid' must be an object with 'values' and "
                     f"optionally 'seeds', 'bindings' and 'widen'")
  widen = value.get("widen", 0)
  if type(widen) is not int or widen < 0:
    raise SweepError(f"sweep file {path!r}: lr_grid 'widen' must be a non-negative integer, got {widen!r}")
  values, seeds = value["values"], value.get("seeds", [0])
  if (not isinstance(values, list) or not values or len(set(values)) != len(values)
      or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
                 for x in values)):
    raise SweepError(f"sweep file {path!r}: lr_grid 'values' must be distinct positive learning "
                     f"rates, got {values!r}")
  if not isinstance(seeds, list) or not seeds or not all(type(x) is int for x in seeds):
    raise SweepError(f"sweep file {path!r}: lr_grid 'seeds' must be a non-empty list of integers")
  bindings = _strings(value.get("bindings", []), path, "lr_grid.bindings")
  if any(binds_name(b, LR_BINDING) for b in bindings):
    raise SweepError(f"sweep file {path!r}: lr_grid 'bindings' may not bind {LR_BINDING}: the grid sets it")
  return LrGrid(tuple(float(x) for x in values), tuple(seeds), tuple(bindings), widen)


def _strings(value: Any, path: str, what: str) -> list[str]:
  if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
    raise SweepError(f"sweep file {path!r}: {what!r} must be a list of strings")
  return value


def _gin_value(x: Any) -> str:
  return repr(x) if isinstance(x, str) else json.dumps(x)


def command(variant: Variant, workdir: str) -> list[str]:
  """The training command of one variant (what --print_commands prints); no sample is
  decoded at the end (a sweep compares losses)."""
  return [sys.executable, "-m", "experiments.train", f"--workdir={os.path.join(workdir, variant.name)}",
          *[f"--gin_file={f}" for f in variant.gin_files],
          *[f"--gin_bindings={b}" for b in variant.bindings], "--max_new_tokens=0", *variant.args]


def shell_command(variant: Variant, workdir: str) -> str:
  return " ".join(shlex.quote(a) for a in ["python", *command(variant, workdir)[1:]])


def is_finished(run_dir: str) -> bool:
  path = os.path.join(run_dir, RESULT)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f).get("status") == "finished"


def core_sets(workers: int) -> list[tuple[int, ...]]:
  """This process's cores split into `workers` disjoint sets, one per concurrent run."""
  cores = sorted(os.sched_getaffinity(0))
  if not 1 <= workers <= len(cores):
    raise SweepError(f"{workers} concurrent runs on {len(cores)} cores: use 1 to {len(cores)}")
  return [tuple(int(c) for c in part) for part in np.array_split(cores, workers)]


def run_sweep(variants: list[Variant], workdir: str, cwd: str | None = None, log=print,
              runner=subprocess.run, workers: int = 1) -> list[str]:
  """Runs unfinished variants (each a fresh process, started by `runner`, subprocess.run's
  signature), `workers` at a time, each pinned to its own share of the cores (on a small CPU
  two one-core runs train about 1.2x the tokens per second of one two-core run; a run's
  numerics depend on its thread count, so keep `workers` fixed within a study); returns the
  names that failed. A failure is reported and the sweep goes on."""
  todo = []
  for v in variants:
    if is_finished(os.path.join(workdir, v.name)):
      log(f"[{v.name}] finished earlier: skipped")
    else:
      todo.append(v)
  if workers == 1:
    return [v.name for v in todo if not _run_one(v, workdir, cwd, log, runner, {})]
  free = queue.SimpleQueue()
  for cores in core_sets(workers):
    free.put(cores)

  def pinned(v: Variant) -> bool:
    cores = free.get()
    try:
      return _run_one(v, workdir, cwd, log, runner, {"preexec_fn": lambda: os.sched_setaffinity(0, cores)},
                      f" (cores {','.join(map(str, cores))})")
    finally:
      free.put(cores)

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    ok = list(pool.map(pinned, todo))
  return [v.name for v, good in zip(todo, ok) if not good]


def _run_one(v: Variant, workdir: str, cwd, log, runner, kwargs, where: str = "") -> bool:
  run_dir = os.path.join(workdir, v.name)
  log(f"[{v.name}]{where} {shell_command(v, workdir)}")
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, "sweep.log"), "a") as out:
    proc = runner(command(v, workdir), cwd=cwd, stdout=out, stderr=subprocess.STDOUT, **kwargs)
  if proc.returncode != 0:
    log(f"[{v.name}] FAILED (exit {proc.returncode}); see {os.path.join(run_dir, 'sweep.log')}")
  return proc.returncode == 0
