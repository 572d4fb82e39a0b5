"""The training-budget axis of a results page: each model's gap to a reference model at each
sweep's budget, and the training loss beside the validation loss (where repeated data
starts to be fitted). A sweep here is (rows of moe.research.sweep_results.collect, its
training tokens: `tokens`)."""

from __future__ import annotations

from typing import Any

from moe.research import comparisons as compare
from moe.research.plots import plot_intervals
from moe.research.stats import paired_t
from moe.research.sweep_results import seed_summary

Sweep = tuple[list[dict[str, Any]], int]


def tokens(rows: list[dict[str, Any]]) -> int:
  """Training tokens of the sweep's finished runs (steps x batch x sequence length; they must agree)."""
  seen = {r["train_tokens"] for r in rows if r["status"] == "finished" and r.get("train_tokens") is not None}
  if len(seen) != 1:
    raise ValueError(f"the sweep's finished runs trained on {sorted(seen)} tokens: expected one budget")
  return seen.pop()


def _name(n: int) -> str:
  return f"{n / 1e6:.3g}M tokens" if n >= 100_000 else f"{n:,} tokens"


def gap_to(sweeps: list[Sweep], ref: str, plot_path: str | None = None) -> str:
  """Each model's final validation loss minus `ref`'s at each sweep's budget: per-seed paired
  differences, their mean and 95% t interval (no correction: a description of the trend; the
  sweeps' comparison tables decide)."""
  points: dict[str, list[tuple[float, float, float | None, float | None]]] = {}
  cells: dict[str, dict[int, str]] = {}
  budgets = [n for _, n in sweeps]
  for rows, n in sweeps:
    runs = compare.runs_by_model(rows)
    if ref not in runs:
      raise ValueError(f"budget: no finished run of {ref!r} in a sweep of {n:,} tokens")
    for model, by_seed in runs.items():
      seeds = sorted(set(by_seed) & set(runs[ref]))
      if model == ref or not seeds:
        continue
      t = paired_t([by_seed[s]["eval_loss"] for s in seeds], [runs[ref][s]["eval_loss"] for s in seeds])
      lo, hi = t.ci if t.ci is not None else (None, None)
      points.setdefault(model, []).append((n, t.mean, lo, hi))
      cells.setdefault(model, {})[n] = (f"{t.mean:+.3f} [{lo:+.3f}, {hi:+.3f}] ({len(seeds)} seeds)"
                                        if lo is not None else f"{t.mean:+.3f} (1 seed)")
  lines = _table(f"model - {ref}", budgets, cells)
  lines += ["", "Mean of the per-seed differences of final validation loss (nats/token), with its "
            "95% paired-t interval over the seeds (n - 1 df, no correction)."]
  if plot_path is not None:
    plot_intervals(plot_path, points, "training tokens", f"validation loss minus {ref}'s",
                   f"Each model's gap to {ref} against the training budget")
  return "\n".join(lines)


def train_and_validation(sweeps: list[Sweep]) -> str:
  """Per model at each sweep's budget: the training batches' loss over the last tenth of the
  steps, the final validation loss, and their difference (means over seeds)."""
  budgets = [n for _, n in sweeps]
  cells: dict[str, dict[int, str]] = {}
  for rows, n in sweeps:
    for r in seed_summary(rows):
      train = r["late_train_lm_loss"]
      if train is not None:
        cells.setdefault(r["model"], {})[n] = f"{train:.3f} / {r['mean']:.3f} ({r['mean'] - train:+.3f})"
  lines = _table("model", budgets, cells)
  lines += ["", "Training batches' loss over the last tenth of the steps (each batch scored before its "
            "update) / final validation loss (validation minus training), means over the seeds."]
  return "\n".join(lines)


def _table(first: str, budgets: list[int], cells: dict[str, dict[int, str]]) -> list[str]:
  lines = [f"| {first} | " + " | ".join(_name(b) for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
  return lines + [f"| {m} | " + " | ".join(c.get(b, "-") for b in budgets) + " |" for m, c in cells.items()]
