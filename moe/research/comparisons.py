"""A sweep's declared comparisons (its file's "comparisons": pairs of models A, B): for each,
the per-seed differences A - B of the final validation loss, their mean and paired-t 95%
interval (n - 1 df), a paired bootstrap interval over the held-out documents (the runs'
eval_docs.npz), and Holm-corrected decisions over all declared comparisons; written as
comparisons.md (a table results pages include verbatim) and comparisons.json.

A difference is called real when, after Holm's correction over the m declared comparisons
(family-wise error 5%), both the paired t over seeds and the bootstrap over documents
exclude zero: seeds measure how much A - B moves with initialisation and data order,
documents how much it depends on the held-out sample. A comparison may name another of the
results' per-run metrics ([A, B, "max_over_mean_load"]): it has the t over seeds only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from moe.research.stats import Bootstrap, PairedT, holm, paired_bootstrap, paired_t
from moe.research.sweep import model_of
from moe.train.run_files import read_eval_docs

ALPHA, RESAMPLES, BOOTSTRAP_SEED = 0.05, 10_000, 0
LOSS = "eval_loss"


@dataclasses.dataclass
class Comparison:
  a: str
  b: str
  seeds: list[str | None]         # seeds both models finished (None: runs without a seed axis)
  paired: PairedT | None          # None: no pair of finished runs
  boot: Bootstrap | None
  boot_note: str = ""             # why there is no bootstrap
  holm_p: float | None = None     # Holm-adjusted p of the paired t
  holm_level: float | None = None  # its Holm step's two-sided level 1 - alpha / (m - i + 1)
  holm_ci: tuple[float, float] | None = None  # the t interval at that level
  boot_holm_p: float | None = None
  called: bool = False
  metric: str = LOSS               # the results' per-run value compared (documents: the loss only)


def runs_by_model(rows: list[dict[str, Any]], metric: str = LOSS) -> dict[str, dict[str | None, dict[str, Any]]]:
  """{model: {seed: row}} of the finished runs with a value of `metric`."""
  out: dict[str, dict[str | None, dict[str, Any]]] = {}
  for r in rows:
    if r["status"] == "finished" and r.get(metric) is not None:
      model, seed = model_of(r["variant"])
      out.setdefault(model, {})[seed] = r
  return out


def _seed_order(seed: str | None):
  return (0, int(seed), "") if seed is not None and seed.lstrip("-").isdigit() else (1, 0, str(seed))


def _bootstrap(workdir: str, runs_a: list[str], runs_b: list[str], resamples: int,
               seed: int) -> tuple[Bootstrap | None, str]:
  docs = {name: read_eval_docs(os.path.join(workdir, name)) for name in runs_a + runs_b}
  missing = [n for n, d in docs.items() if d is None]
  if missing:
    return None, f"no document losses (eval_docs.npz) in {len(missing)} of its {len(docs)} runs"
  first = docs[runs_a[0]]
  for name, d in docs.items():
    if not (np.array_equal(d["fingerprint"], first["fingerprint"]) and np.array_equal(d["tokens"], first["tokens"])):
      return None, f"held-out documents of {name} differ from those of {runs_a[0]}"
  return paired_bootstrap(np.stack([docs[n]["loss"] for n in runs_a]), np.stack([docs[n]["loss"] for n in runs_b]),
                          first["tokens"], resamples, seed=seed), ""


def compare(rows: list[dict[str, Any]], workdir: str, pairs, alpha: float = ALPHA,
            resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> list[Comparison]:
  """The declared comparisons `pairs` [(A, B)] of a sweep's rows (sweep_results.collect)."""
  out = []
  for a, b, *rest in pairs:
    metric = rest[0] if rest else LOSS
    runs = runs_by_model(rows, metric)
    ra, rb = runs.get(a, {}), runs.get(b, {})
    seeds = sorted(set(ra) & set(rb), key=_seed_order)
    if not seeds:
      out.append(Comparison(a, b, [], None, None, "no seed finished for both", metric=metric))
      continue
    paired = paired_t([ra[s][metric] for s in seeds], [rb[s][metric] for s in seeds])
    if metric == LOSS:
      boot, note = _bootstrap(workdir, [ra[s]["variant"] for s in seeds], [rb[s]["variant"] for s in seeds],
                              resamples, seed)
    else:
      boot, note = None, f"{metric} is not a per-document loss"
    out.append(Comparison(a, b, seeds, paired, boot, note, metric=metric))
  t_adj, t_rej, levels = holm([c.paired.p if c.paired else None for c in out], alpha)
  b_adj, b_rej, _ = holm([c.boot.p if c.boot else None for c in out], alpha)
  for i, c in enumerate(out):
    if c.paired is not None and c.paired.p is not None:
      c.holm_p, c.holm_level = float(t_adj[i]), float(1 - levels[i])
      c.holm_ci = c.paired.interval(c.holm_level)
    if c.boot is not None:
      c.boot_holm_p = float(b_adj[i])
    c.called = bool(t_rej[i]) and (c.boot is None or bool(b_rej[i]))
  return out


def _signed(x: float) -> str:
  return f"{x:+.4f}"


def _ci(ci) -> str:
  return "-" if ci is None else f"[{_signed(ci[0])}, {_signed(ci[1])}]"


def _p(p) -> str:
  return "-" if p is None else f"{p:.3g}"


COLUMNS = ["A - B", "seeds", "per seed", "mean", "95% CI (t)", "p (t)", "Holm p (t)",
           "Holm-level CI (t)", "95% CI (documents)", "Holm p (documents)", "called"]


def _called(c: Comparison, alpha: float) -> str:
  if c.paired is None or c.paired.p is None:
    return "untested"
  if not c.called:
    seeds_only = c.holm_p is not None and c.holm_p <= alpha and c.boot is not None
    return "not real (seeds only: documents' interval includes 0)" if seeds_only else "not real"
  side = "A lower" if c.paired.mean < 0 else "A higher"
  why = "" if c.boot is not None else "; t only: no document losses" if c.metric == LOSS else "; t only"
  return f"real ({side}{why})"


def markdown(results: list[Comparison], alpha: float = ALPHA, footnote: bool = True) -> str:
  """The comparison table and, below it, how it was computed (footnote=False: only why a
  comparison has no bootstrap)."""
  lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---:|---|" + "---:|" * (len(COLUMNS) - 3)]
  for c in results:
    p = c.paired
    level = "-" if c.holm_ci is None else f"{_ci(c.holm_ci)} at {100 * c.holm_level:.4g}%"
    name = f"{c.a} - {c.b}" + ("" if c.metric == LOSS else f" ({c.metric})")
    cells = [name, str(len(c.seeds)),
             " / ".join(_signed(d) for d in p.diffs) if p else "-", _signed(p.mean) if p else "-",
             _ci(p.ci if p else None), _p(p.p if p else None), _p(c.holm_p), level,
             _ci(c.boot.ci) if c.boot else "-", _p(c.boot_holm_p), _called(c, alpha)]
    lines.append("| " + " | ".join(cells) + " |")
  boots = [c.boot for c in results if c.boot]
  docs = sorted({b.documents for b in boots})
  notes = sorted({c.boot_note for c in results if c.boot_note})
  if len(notes) == 1 and all(c.boot_note == notes[0] for c in results):
    notes = [f"every comparison: {notes[0]}"]
  else:
    notes = [f"{c.a} - {c.b}: {c.boot_note}" for c in results if c.boot_note]
  if not footnote:
    return "\n".join(lines + (["", "No bootstrap: " + "; ".join(notes) + "."] if notes else []))
  lines += ["", f"A - B: final validation loss (nats/token; another metric where named) of model A minus model B, paired by seed "
            f"(per seed: in seed order). 95% CI (t): mean +- t(0.975, n - 1) sd / sqrt(n) over the n "
            f"seeds. Correction: Holm-Bonferroni over the m = {len(results)} declared comparisons at "
            f"family-wise error {alpha:g}; the comparison with the i-th smallest p is tested at level "
            f"{alpha:g} / (m - i + 1), and 'Holm-level CI (t)' is its t interval at that level. "
            f"95% CI (documents): paired bootstrap over the "
            f"{'/'.join(map(str, docs)) if docs else '-'} held-out documents "
            f"({boots[0].resamples if boots else RESAMPLES} resamples with replacement, numpy seed "
            f"{BOOTSTRAP_SEED}, percentile interval) of the token-weighted mean loss difference, each "
            f"document's difference averaged over the seeds; its Holm p from the bootstrap's two-sided p. "
            f"Called real: both Holm-adjusted p-values at most {alpha:g}, i.e. at its Holm level the t "
            f"interval over seeds excludes zero (as did those of every comparison with a smaller p), and "
            f"so does the bootstrap's."]
  if notes:
    lines += ["", "No bootstrap: " + "; ".join(notes) + "."]
  return "\n".join(lines)


def to_json(results: list[Comparison]) -> list[dict[str, Any]]:
  return [dataclasses.asdict(c) for c in results]


def write(rows: list[dict[str, Any]], workdir: str, out_dir: str, pairs) -> str:
  """out_dir/comparisons.md and comparisons.json; returns the markdown."""
  results = compare(rows, workdir, pairs)
  text = markdown(results)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "comparisons.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(out_dir, "comparisons.json"), "w") as f:
    json.dump(to_json(results), f, indent=1)
  return text
