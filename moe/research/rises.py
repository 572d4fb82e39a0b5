"""Per-seed statistics of experiments.analyze's analysis.json files, compared over seeds:
Figure 4's loss rise (each run's loss with the most routed experts disabled minus its loss as
trained) and category specialisation (I(category; experts) / H(category), mean over MoE
layers, minus the same for token-id routing at the model's N', K'); per model and seed, and
paired t tests of the differences between models with Holm's correction."""

from __future__ import annotations

import json
import os

import numpy as np

from moe.research.comparisons import ALPHA
from moe.research.stats import holm, paired_t
from moe.research.sweep import model_of


CATEGORIES = "categories"


def _what(key: str) -> str:
  return "I/H over the null" if key == CATEGORIES else "rise"


def _stat(run: dict, key: str) -> float:
  if key == CATEGORIES:  # specialisation beyond what routing by token id alone carries
    c = run[key]
    return float(np.mean(c["normalized"])) - c["token_id_normalized"]
  return run[key][-1][2] - run["loss"]  # the rise at the analysis's last (largest) fraction


def _rises(dirs: list[str], key: str = "redundancy") -> dict[str, dict[str, float]]:
  """{model: {seed: statistic}} over the analysis dirs: for a redundancy analysis (or a
  variant) the loss of its last cell minus the run's loss as trained; for categories the
  normalised information over the token-id null."""
  out: dict[str, dict[str, float]] = {}
  for d in dirs:
    with open(os.path.join(d, "analysis.json")) as f:
      runs = json.load(f)
    for name, run in runs.items():
      if key in run:
        model, seed = model_of(name)
        out.setdefault(model, {})[seed] = _stat(run, key)
  return out


def table(dirs: list[str], key: str = "redundancy") -> str:
  lines = [f"| model | {_what(key)} per seed | mean | spread |", "|---|---|---:|---:|"]
  for model, by_seed in _rises(dirs, key).items():
    v = [by_seed[s] for s in sorted(by_seed)]
    lines.append(f"| {model} | {' / '.join(f'{x:+.3f}' for x in v)} | {np.mean(v):+.3f} | {max(v) - min(v):.3f} |")
  return "\n".join(lines)


def comparisons(dirs: list[str], pairs: list[str], alpha: float = ALPHA, key: str = "redundancy") -> str:
  """pairs: 'A:B', each side a model, or MODEL@ANALYSIS for another analysis's value (e.g. a
  model's rise with its shared experts off against another's rise with them on)."""
  cache: dict[str, dict[str, dict[str, float]]] = {}

  def side(pair: str, name: str) -> tuple[str, dict[str, float]]:
    model, _, k = name.partition("@")
    k = k or key
    if k not in cache:
      cache[k] = _rises(dirs, k)
    if model not in cache[k]:
      raise ValueError(f"{_what(k)} comparison {pair!r}: models with a {k} analysis: {sorted(cache[k])}")
    return name, cache[k][model]

  tests = []
  for pair in pairs:
    if pair.count(":") != 1:
      raise ValueError(f"comparison {pair!r}: expected A:B")
    (a, va), (b, vb) = (side(pair, x) for x in pair.split(":"))
    seeds = sorted(set(va) & set(vb))
    tests.append((a, b, paired_t([va[s] for s in seeds], [vb[s] for s in seeds])))
  adj, rejected, levels = holm([t.p for _, _, t in tests], alpha)
  lines = [f"| A - B ({_what(key)}) | per seed | mean | Holm-level t interval | Holm p | called |", "|---|---|---:|---:|---:|---|"]
  for (a, b, t), p, rej, lvl in zip(tests, adj, rejected, levels):
    lo, hi = t.interval(1 - lvl)
    lines.append(f"| {a} - {b} | {' / '.join(f'{d:+.3f}' for d in t.diffs)} | {t.mean:+.3f} | "
                 f"[{lo:+.3f}, {hi:+.3f}] at {100 * (1 - lvl):.3g}% | {p:.3g} | {'real' if rej else 'not real'} |")
  family = (f"Holm over these {len(tests)} comparisons at family-wise error {alpha:g}" if len(tests) > 1
            else f"one comparison, tested at {alpha:g}")
  lines += ["", f"Paired t over seeds (n - 1 df) of the {_what(key)} differences; {family}."]
  return "\n".join(lines)
