"""A sweep's results: one row per variant from its run files (total and activated
parameters, FLOPs per token, final validation loss, routing statistics), written as
results.md and results.csv, and the validation-loss curves as results.png."""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import numpy as np

from moe.model.counts import count_params
from moe.research.plots import plot_lines
from moe.research.sweep import Variant
from moe.train.run_files import RESULT, RUN_CONFIG, read_run_configs

COLUMNS = ["variant", "status", "step", "total_params", "activated_params", "train_flops_per_token",
           "eval_loss", "max_over_mean_load", "dropped_fraction", "router_entropy"]


def collect(variants: list[Variant], workdir: str) -> list[dict[str, Any]]:
  """One row per variant from its run_config.json and result.json (missing: status 'not run')."""
  rows = []
  for v in variants:
    run_dir = os.path.join(workdir, v.name)
    row: dict[str, Any] = {c: None for c in COLUMNS}
    row.update(variant=v.name, status="not run")
    config_path, result_path = (os.path.join(run_dir, n) for n in (RUN_CONFIG, RESULT))
    if os.path.exists(config_path):
      configs = read_run_configs(run_dir)
      c = count_params(configs.model, configs.data.seq_len)
      row.update(total_params=c.total, activated_params=c.activated,
                 train_flops_per_token=c.train_flops_per_token, status="started")
    if os.path.exists(result_path):
      with open(result_path) as f:
        result = json.load(f)
      row.update(status=result["status"], step=result["step"], eval_loss=result.get("eval_loss"))
      for stat in ("max_over_mean_load", "dropped_fraction", "router_entropy"):
        values = result.get("layers", {}).get(stat)
        if values is not None:
          row[stat] = float(np.mean(values))  # mean over MoE layers
    rows.append(row)
  return rows


def _fmt(v: Any) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
  return str(v)


def markdown(rows: list[dict[str, Any]]) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
  return "\n".join(lines)


def eval_curves(variants: list[Variant], workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{variant: [(step, validation loss)]} from each run's metrics.jsonl."""
  curves = {}
  for v in variants:
    path = os.path.join(workdir, v.name, "metrics.jsonl")
    if os.path.exists(path):
      with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
      points = sorted({r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}.items())
      if points:
        curves[v.name] = points
  return curves


def write_results(rows: list[dict[str, Any]], workdir: str,
                  curves: dict[str, list[tuple[int, float]]] | None = None) -> tuple[str, str]:
  """workdir/results.md and workdir/results.csv (and results.png, the validation-loss
  curves, when given); returns the table paths."""
  if curves:
    plot_lines(os.path.join(workdir, "results.png"), curves, "step", "validation loss",
               "validation loss during training")
  md, csv_path = os.path.join(workdir, "results.md"), os.path.join(workdir, "results.csv")
  with open(md, "w") as f:
    f.write(markdown(rows) + "\n")
  with open(csv_path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
  return md, csv_path
