"""A sweep's learning-rate step (its file's "lr_grid"): every model of the sweep trains at
each rate of the grid and each of the grid's seeds with the grid's bindings added (a short
budget), in WORKDIR/lr_search/<model>,lr=<rate>,SEED=<seed>; each model's rate is the one
with the lowest mean final validation loss over those seeds (a tie goes to the lower rate),
and the model's runs in the sweep use it. The choice, with every pilot's loss, goes to
WORKDIR/learning_rates.json (models of other sweeps sharing the workdir kept) and to the
results' learning_rates.md; sweep_results' learning_rate column says which rate each run
used, read from the run's own config.

A pilot's bindings: the model's (sweep file and command line, its SEED binding dropped),
then the grid's (so its budget holds whatever the command line sets for the main runs),
then SEED and the rate. Finished pilots are skipped on a re-run, like the sweep's runs.

A grid with "widen": n adds, for each model whose best rate is the grid's lowest or highest,
the next rate beyond that edge (spaced like the two rates nearest it), up to n times, so a
chosen rate is a minimum with a worse rate on each side; one still at an edge is flagged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Any

import numpy as np

from moe.research.sweep import (LR_BINDING, SEED_KEY, LrGrid, Variant, binds_name, is_finished,
                                model_of, run_sweep)
from moe.train.run_files import RESULT, RUN_CONFIG

PILOT_DIR, CHOSEN = "lr_search", "learning_rates.json"


def rate_name(rate: float) -> str:
  return f"{rate:g}"


def pilot_name(model: str, rate: float, seed: int) -> str:
  return ",".join(p for p in (model, f"lr={rate_name(rate)}", f"{SEED_KEY}={seed}") if p)


def models(variants: list[Variant]) -> dict[str, Variant]:
  """{model: its first variant}, in sweep order."""
  out: dict[str, Variant] = {}
  for v in variants:
    out.setdefault(model_of(v.name)[0], v)
  return out


def pilots(variants: list[Variant], grid: LrGrid, rates: dict[str, list[float]] | None = None) -> list[Variant]:
  """The learning-rate runs of every model of `variants`: rate x seed (`rates`: a model's own
  rates, the grid's and its widening, in place of the grid's)."""
  out = []
  for model, v in models(variants).items():
    own = tuple(b for b in v.bindings if not binds_name(b, SEED_KEY))
    for rate in (rates or {}).get(model, grid.values):
      for seed in grid.seeds:
        out.append(Variant(pilot_name(model, rate, seed), v.gin_files,
                           own + grid.bindings + (f"{SEED_KEY} = {seed}", f"{LR_BINDING} = {rate!r}"),
                           v.args))
  return out


def beyond(rates: list[float], chosen: float) -> float | None:
  """The next rate past the grid's edge where `chosen` lies (spaced as the two rates nearest
  that edge are), None when `chosen` is inside."""
  r = sorted(rates)
  if len(r) < 2 or chosen not in (r[0], r[-1]):
    return None
  new = r[0] * r[0] / r[1] if chosen == r[0] else r[-1] * r[-1] / r[-2]
  return float(f"{new:.6g}")


def widened_rates(variants: list[Variant], grid: LrGrid, pilot_dir: str,
                  run=None) -> dict[str, list[float]]:
  """Each model's rates: the grid's, then up to grid.widen rates beyond the edge while the
  best rate lies on it. run(pilots) trains a round's new pilots (all models' at once); without
  it, a rate beyond counts only once its pilots finished (collecting what an earlier run did)."""
  rates = {model: list(grid.values) for model in models(variants)}
  for _ in range(grid.widen):
    table = choose(variants, grid, pilot_dir, rates)
    new = {m: beyond(rates[m], e["chosen"]) for m, e in table.items() if e["chosen"] is not None}
    new = {m: r for m, r in new.items() if r is not None}
    if not new:
      break
    if run is not None:
      run(pilots([v for v in variants if model_of(v.name)[0] in new], grid, {m: [r] for m, r in new.items()}))
    for m, r in new.items():
      if all(_final_loss(os.path.join(pilot_dir, pilot_name(m, r, s))) is not None for s in grid.seeds):
        rates[m].append(r)
  return rates


def _final_loss(run_dir: str) -> float | None:
  if not is_finished(run_dir):
    return None
  with open(os.path.join(run_dir, RESULT)) as f:
    loss = json.load(f).get("eval_loss")
  return float(loss) if loss is not None and math.isfinite(loss) else None


def choose(variants: list[Variant], grid: LrGrid, pilot_dir: str,
           rates: dict[str, list[float]] | None = None) -> dict[str, dict[str, Any]]:
  """{model: {'chosen': rate or None, 'losses': {rate: [final loss per seed, None if not
  finished]}, 'means': {rate: mean or None}, 'at_edge', 'grid', 'seeds', 'bindings'}}. A rate
  counts only when every seed of the grid finished with a finite loss. `rates`: each model's
  rates (widened_rates), in place of the grid's."""
  table = {}
  for model in models(variants):
    grid_rates = sorted((rates or {}).get(model, grid.values))
    losses = {rate_name(r): [_final_loss(os.path.join(pilot_dir, pilot_name(model, r, s))) for s in grid.seeds]
              for r in grid_rates}
    means = {k: (float(np.mean(v)) if all(x is not None for x in v) else None) for k, v in losses.items()}
    done = [(means[rate_name(r)], r) for r in grid_rates if means[rate_name(r)] is not None]
    chosen = min(done)[1] if done else None
    table[model] = {"chosen": chosen, "losses": losses, "means": means,
                    "at_edge": chosen is not None and len(grid_rates) > 1
                    and chosen in (grid_rates[0], grid_rates[-1]),
                    "grid": grid_rates, "grid_values": list(grid.values), "seeds": list(grid.seeds),
                    "bindings": list(grid.bindings)}
  return table


def collected(variants: list[Variant], grid: LrGrid, pilot_dir: str) -> dict[str, dict[str, Any]]:
  """choose() over the rates the finished pilots reached (the grid's and its widening)."""
  return choose(variants, grid, pilot_dir, widened_rates(variants, grid, pilot_dir))


def write_chosen(workdir: str, table: dict[str, dict[str, Any]]) -> str:
  """Merges `table` into WORKDIR/learning_rates.json; returns its path."""
  path = os.path.join(workdir, CHOSEN)
  merged = read_chosen(workdir)
  merged.update(table)
  os.makedirs(workdir, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(merged, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)
  return path


def read_chosen(workdir: str) -> dict[str, dict[str, Any]]:
  path = os.path.join(workdir, CHOSEN)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def with_rates(variants: list[Variant], table: dict[str, dict[str, Any]]) -> tuple[list[Variant], list[str]]:
  """(the variants whose model has a chosen rate, with it bound last; the names of the
  others)."""
  out, missing = [], []
  for v in variants:
    rate = table.get(model_of(v.name)[0], {}).get("chosen")
    if rate is None:
      missing.append(v.name)
    else:
      out.append(dataclasses.replace(v, bindings=v.bindings + (f"{LR_BINDING} = {rate!r}",)))
  return out, missing


def recorded_rate(run_dir: str) -> float | None:
  """The learning rate a run was (last) started with, from its run_config.json."""
  path = os.path.join(run_dir, RUN_CONFIG)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get("train", {}).get("learning_rate")


def run_step(variants: list[Variant], grid: LrGrid, workdir: str, cwd: str | None = None, log=print,
             runner=None, run: bool = True, workers: int = 1) -> tuple[list[Variant], list[str], dict[str, dict[str, Any]]]:
  """Runs the unfinished pilots (run=False: none), chooses each model's rate and records it;
  -> (the variants at their model's rate, the names of failed pilots and of variants left
  without a rate, the choice table)."""
  pilot_dir = os.path.join(workdir, PILOT_DIR)
  kwargs = {} if runner is None else {"runner": runner}
  failed = run_sweep(pilots(variants, grid), pilot_dir, cwd, log, workers=workers, **kwargs) if run else []

  def widen(runs: list[Variant]) -> None:
    log(f"widening the grid past its edge: {', '.join(v.name for v in runs)}")
    failed.extend(run_sweep(runs, pilot_dir, cwd, log, workers=workers, **kwargs))

  rates = widened_rates(variants, grid, pilot_dir, widen if run else None)
  table = choose(variants, grid, pilot_dir, rates)
  write_chosen(workdir, table)
  for model, entry in table.items():
    edge = " (at the edge of the grid: widen it)" if entry["at_edge"] else ""
    log(f"[{model or 'run'}] learning rate {entry['chosen']}{edge}")
  mains, missing = with_rates(variants, table)
  if run:
    adopt_pilots(mains, variants, grid, workdir, log, rates)
  for name in missing:
    log(f"[{name}] no learning rate chosen (a pilot of every rate is missing or failed): not run")
  for v in mains:
    run_dir, want = os.path.join(workdir, v.name), table[model_of(v.name)[0]]["chosen"]
    used = recorded_rate(run_dir)
    if is_finished(run_dir) and used is not None and used != want:
      log(f"[{v.name}] warning: finished earlier at learning rate {used}, not the chosen {want}; "
          f"delete {run_dir} to rerun it")
  return mains, failed + missing, table


def adopt_pilots(mains: list[Variant], variants: list[Variant], grid: LrGrid, workdir: str, log=print,
                 rates: dict[str, list[float]] | None = None) -> None:
  """A grid without bindings of its own trains on the sweep's budget: its finished pilot at
  a model's chosen rate and one of the sweep's seeds is that seed's run, with the same gin
  files, bindings and flags. It is copied to the run's directory (absent there) rather than
  trained again."""
  if grid.bindings:
    return
  pilot_dir = os.path.join(workdir, PILOT_DIR)
  by_name = {v.name: v for v in pilots(variants, grid, rates)}
  for v in mains:
    model, seed = model_of(v.name)
    run_dir = os.path.join(workdir, v.name)
    rate = next(b.split("=", 1)[1].strip() for b in reversed(v.bindings) if binds_name(b, LR_BINDING))
    pilot = by_name.get(pilot_name(model, float(rate), int(seed))) if seed is not None and seed.lstrip("-").isdigit() else None
    if (pilot is None or os.path.exists(run_dir) or not is_finished(os.path.join(pilot_dir, pilot.name))
        or (pilot.gin_files, sorted(pilot.bindings), pilot.args) != (v.gin_files, sorted(v.bindings), v.args)):
      continue
    shutil.copytree(os.path.join(pilot_dir, pilot.name), run_dir)
    log(f"[{v.name}] is the finished pilot {pilot.name} (same config): copied, not retrained")


def markdown(table: dict[str, dict[str, Any]]) -> str:
  """| model | lr=... (mean final validation loss over the grid's seeds, and each seed's) | chosen |"""
  if not table:
    return ""
  rates = [rate_name(r) for r in sorted({float(k) for e in table.values() for k in e["losses"]})]
  fmt = lambda v: "-" if v is None else f"{v:.4f}"
  lines = ["| model | " + " | ".join(f"lr={r}" for r in rates) + " | chosen |",
           "|---|" + "---:|" * len(rates) + "---:|"]
  for model, e in table.items():
    cells = [f"{fmt(e['means'][r])} ({' / '.join(fmt(x) for x in e['losses'][r])})" if r in e["losses"] else "not run"
             for r in rates]
    chosen = "-" if e["chosen"] is None else rate_name(e["chosen"]) + (" (edge)" if e["at_edge"] else "")
    lines.append(f"| {model or 'run'} | " + " | ".join(cells) + f" | {chosen} |")
  seeds = next(iter(table.values()))["seeds"]
  lines += ["", f"Mean final validation loss over seeds {seeds} (each seed's in parentheses) on the "
            f"grid's budget ({'; '.join(next(iter(table.values()))['bindings']) or 'the sweep budget'}); "
            f"chosen: the lowest mean. (edge): the lowest or highest rate the model ran. Rates beyond "
            f"the grid's {[rate_name(r) for r in next(iter(table.values()))['grid_values']]}: the grid "
            f"widened past its edge while a model's best rate lay on it."]
  return "\n".join(lines)
