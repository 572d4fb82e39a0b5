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
axis also summary.md (mean and spread over seeds per model).
"""

from __future__ import annotations

import os

from absl import app, flags

from experiments import common_flags, errors, gin_flags
from experiments.mesh_flag import mesh_flag
from moe.research import sweep, sweep_results

_SWEEP = flags.DEFINE_string("sweep", None, "sweep file (JSON)", required=True)
_WORKDIR = common_flags.workdir(required=True)  # the parent of the variants' directories
_PRINT = flags.DEFINE_bool("print_commands", False, "print one launch command per variant, run nothing")
_COLLECT = flags.DEFINE_bool("collect_only", False, "only collect the results table")
_ONLY = flags.DEFINE_multi_string("only", [], "run only these variants")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  files, bindings = gin_flags.requested()
  mesh = mesh_flag()
  variants = sweep.with_overrides(sweep.load_sweep(_SWEEP.value), files, bindings,
                                  [f"--mesh={mesh}"] if mesh is not None else [])
  if _ONLY.value:
    unknown = sorted(set(_ONLY.value) - {v.name for v in variants})
    if unknown:
      raise app.UsageError(f"--only {unknown}: not in the sweep; variants: {[v.name for v in variants]}")
    variants = [v for v in variants if v.name in _ONLY.value]
  if _PRINT.value:
    for v in variants:
      print(sweep.shell_command(v, _WORKDIR.value))
    return
  workdir = os.path.abspath(_WORKDIR.value)
  # Runs start in the repository root, where the sweep files' config paths point.
  failed = [] if _COLLECT.value else sweep.run_sweep(variants, workdir, cwd=gin_flags.REPO_ROOT)
  rows = sweep_results.collect(variants, workdir)
  out_dir = os.path.join(workdir, os.path.splitext(os.path.basename(_SWEEP.value))[0] + ".results")
  md, csv_path = sweep_results.write_results(rows, workdir, out_dir,
                                             sweep_results.eval_curves(variants, workdir))
  print(sweep_results.markdown(rows))
  summary = sweep_results.seed_summary(rows)
  if summary:
    print("\nover seeds:\n" + sweep_results.summary_markdown(summary))
  print(f"written: {md}, {csv_path}")
  if failed:
    raise SystemExit(f"variants failed: {failed}")


if __name__ == "__main__":
  errors.run(main, flags_parser=gin_flags.flags_parser)
