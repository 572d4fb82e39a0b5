"""Figure 4's loss rises over seeds, from experiments.analyze's analysis.json files: each run's
loss with the most routed experts disabled minus its loss as trained, per model and seed, and
paired t tests of the differences between models with Holm's correction."""

from __future__ import annotations

import json
import os

import numpy as np

from moe.research.comparisons import ALPHA
from moe.research.stats import holm, paired_t
from moe.research.sweep import model_of


def _rises(dirs: list[str], key: str = "redundancy") -> dict[str, dict[str, float]]:
  """{model: {seed: loss rise with the most experts disabled}} over the analysis dirs: the
  loss of the `key` analysis's last cell minus the run's loss as trained."""
  out: dict[str, dict[str, float]] = {}
  for d in dirs:
    with open(os.path.join(d, "analysis.json")) as f:
      runs = json.load(f)
    for name, run in runs.items():
      if key in run:
        model, seed = model_of(name)
        out.setdefault(model, {})[seed] = run[key][-1][2] - run["loss"]
  return out


def table(dirs: list[str], key: str = "redundancy") -> str:
  lines = ["| model | rise per seed | mean | spread |", "|---|---|---:|---:|"]
  for model, by_seed in _rises(dirs, key).items():
    v = [by_seed[s] for s in sorted(by_seed)]
    lines.append(f"| {model} | {' / '.join(f'{x:+.3f}' for x in v)} | {np.mean(v):+.3f} | {max(v) - min(v):.3f} |")
  return "\n".join(lines)


def comparisons(dirs: list[str], pairs: list[str], alpha: float = ALPHA,
                     key: str = "redundancy") -> str:
  table_ = _rises(dirs, key)
  tests = []
  for pair in pairs:
    a, _, b = pair.partition(":")
    if a not in table_ or b not in table_:
      raise ValueError(f"rise comparison {pair!r}: models with rises: {sorted(table_)}")
    seeds = sorted(set(table_[a]) & set(table_[b]))
    tests.append((a, b, paired_t([table_[a][s] for s in seeds], [table_[b][s] for s in seeds])))
  adj, rejected, levels = holm([t.p for _, _, t in tests], alpha)
  lines = ["| A - B (rise) | per seed | mean | Holm-level t interval | Holm p | called |", "|---|---|---:|---:|---:|---|"]
  for (a, b, t), p, rej, lvl in zip(tests, adj, rejected, levels):
    lo, hi = t.interval(1 - lvl)
    lines.append(f"| {a} - {b} | {' / '.join(f'{d:+.3f}' for d in t.diffs)} | {t.mean:+.3f} | "
                 f"[{lo:+.3f}, {hi:+.3f}] at {100 * (1 - lvl):.3g}% | {p:.3g} | {'real' if rej else 'not real'} |")
  lines += ["", f"Paired t over seeds (n - 1 df) of the rise differences; Holm over these {len(tests)} "
            f"comparisons at family-wise error {alpha:g}."]
  return "\n".join(lines)
