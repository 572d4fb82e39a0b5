"""Run a sweep: every variant in its own sub-workdir, then a results table.

  python -m experiments.sweep --sweep=experiments/sweeps/ladder_cpu.json --workdir=/tmp/ladder
  python -m experiments.sweep --sweep=... --workdir=... --print_commands   # for a cluster
  python -m experiments.sweep --sweep=... --workdir=... --collect_only
  python -m experiments.sweep --sweep=... --workdir=... --gin.TrainConfig.steps=100 --mesh=data:-1

Gin files and bindings on the command line (--gin_file, --gin_bindings, --gin.NAME=VALUE) and
--mesh apply to every variant, after the sweep file's own (so they win).

Finished variants (result.json with status 'finished') are skipped on a re-run; the others
start or resume from their latest checkpoint. Results go to WORKDIR/<sweep file's name>.results/
(so sweeps sharing a workdir, and so its runs, keep their own tables): results.md,
results.csv, results.png (validation loss during training), load.png; with a SEED product
axis also summary.md (mean and spread over seeds per model); with declared "comparisons"
comparisons.md and .json (per-seed differences, t and document-bootstrap intervals,
Holm-corrected calls: moe.research.comparisons).

With an "lr_grid", each model first runs at every rate and seed of the grid in
WORKDIR/lr_search/ (skipped when finished, like the sweep's runs), and the sweep's runs use
the rate with the lowest mean final validation loss (WORKDIR/learning_rates.json, the
results' learning_rates.md; moe.research.lr_search). --print_commands then prints the
grid's runs, and the sweep's runs once their rates are known.
"""

from __future__ import annotations

import os

from absl import app, flags

from experiments import common_flags, errors, gin_flags
from experiments.mesh_flag import mesh_flag
from moe.research import lr_search, sweep, sweep_results

_SWEEP = flags.DEFINE_string("sweep", None, "sweep file (JSON)", required=True)
_WORKDIR = common_flags.workdir(required=True)  # the parent of the variants' directories
_PRINT = flags.DEFINE_bool("print_commands", False, "print one launch command per variant, run nothing")
_COLLECT = flags.DEFINE_bool("collect_only", False, "only collect the results table")
_ONLY = flags.DEFINE_multi_string("only", [], "run only these variants")
_COPY_TO = flags.DEFINE_string("copy_run_files_to", None, "then copy the runs' files that results pages cite "
                                "(no checkpoints or parameters) to this directory, e.g. docs/results/...")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "runs at once, each pinned to its share of the cores "
                                 "(keep it fixed within a study: a run's numerics depend on its thread count)",
                                 lower_bound=1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  files, bindings = gin_flags.requested()
  mesh = mesh_flag()
  spec = sweep.load_sweep_spec(_SWEEP.value)
  variants = sweep.with_overrides(spec.variants, files, bindings,
                                  [f"--mesh={mesh}"] if mesh is not None else [])
  if spec.lr_grid and any(sweep.binds_name(b, sweep.LR_BINDING) for b in bindings):
    raise app.UsageError(f"the sweep file's lr_grid chooses {sweep.LR_BINDING}: do not bind it on the command line")
  if _ONLY.value:
    unknown = sorted(set(_ONLY.value) - {v.name for v in variants})
    if unknown:
      raise app.UsageError(f"--only {unknown}: not in the sweep; variants: {[v.name for v in variants]}")
    variants = [v for v in variants if v.name in _ONLY.value]
  workdir = os.path.abspath(_WORKDIR.value)
  if _PRINT.value:
    print_commands(spec, variants, workdir if spec.lr_grid else _WORKDIR.value)
    return
  # Runs start in the repository root, where the sweep files' config paths point.
  failed, rates, every = [], None, variants  # every variant has a row, run or not
  if spec.lr_grid:  # the grid's runs, then the sweep's at each model's chosen rate
    variants, not_run, rates = lr_search.run_step(variants, spec.lr_grid, workdir, cwd=gin_flags.REPO_ROOT,
                                                  run=not _COLLECT.value, workers=_PARALLEL.value)
    failed += [] if _COLLECT.value else not_run
  if not _COLLECT.value:
    failed += sweep.run_sweep(variants, workdir, cwd=gin_flags.REPO_ROOT, workers=_PARALLEL.value)
  rows = sweep_results.collect(every, workdir)
  out_dir = os.path.join(workdir, os.path.splitext(os.path.basename(_SWEEP.value))[0] + ".results")
  md, csv_path = sweep_results.write_results(rows, workdir, out_dir,
                                             sweep_results.eval_curves(every, workdir),
                                             spec.comparisons, rates)
  print(sweep_results.markdown(rows))
  summary = sweep_results.seed_summary(rows)
  if summary:
    print("\nover seeds:\n" + sweep_results.summary_markdown(summary))
  if rates:
    print("\nlearning rates:\n" + lr_search.markdown(rates))
  if spec.comparisons:
    with open(os.path.join(out_dir, "comparisons.md")) as f:
      print("\ncomparisons:\n" + f.read().rstrip())
  print(f"written: {md}, {csv_path}")
  if _COPY_TO.value:
    n = sweep_results.copy_run_files(workdir, _COPY_TO.value)
    print(f"copied the files of {n} runs to {_COPY_TO.value}")
  if failed:
    raise SystemExit(f"variants failed: {failed}")


def print_commands(spec, variants, workdir: str) -> None:
  """One launch command per run; with an lr_grid the grid's runs first, then the sweep's at
  the rates chosen so far (those not chosen yet: a comment)."""
  if spec.lr_grid:
    pilot_dir = os.path.join(workdir, lr_search.PILOT_DIR)
    rates = lr_search.widened_rates(variants, spec.lr_grid, pilot_dir)
    for v in lr_search.pilots(variants, spec.lr_grid, rates):
      print(sweep.shell_command(v, pilot_dir))
    table = lr_search.choose(variants, spec.lr_grid, pilot_dir, rates)
    variants, missing = lr_search.with_rates(variants, table)
    if missing:
      print(f"# then, once the runs above have finished (print again): {', '.join(missing)}")
  for v in variants:
    print(sweep.shell_command(v, workdir))


if __name__ == "__main__":
  errors.run(main, flags_parser=gin_flags.flags_parser)
