"""A sweep's results: one row per variant from its run files (total and activated
parameters, FLOPs per token, learning rate, final validation loss, routing statistics, the
expert load over training), written as results.md and results.csv, the validation-loss
curves as results.png, the training batches' expert load as load.png, the selection biases
of topk_bias runs as bias_<variant>.png, for sweeps with a seed axis summary.md (mean and
spread over seeds per model), for declared comparisons comparisons.md
(moe.research.comparisons) and, after a learning-rate step, learning_rates.md."""

from __future__ import annotations

import csv
import json
import os
import shutil
from typing import Any

import numpy as np

from moe.model.counts import count_params
from moe.research import comparisons as compare
from moe.research import lr_search
from moe.research.plots import plot_lines
from moe.research.sweep import Variant
from moe.train.run_files import EVAL_DOCS, RESULT, RUN_CONFIG, read_run_configs

COLUMNS = ["variant", "status", "step", "total_params", "activated_params", "train_flops_per_token",
           "learning_rate", "eval_loss", "max_over_mean_load", "train_max_over_mean_load", "late_train_max_over_mean_load",
           "late_train_lm_loss", "dropped_fraction", "router_entropy", "gate_mass", "real_experts_per_token"]
# real_experts_per_token: of a token's routed choices, those not sent to a zero-compute expert.
STATS = ("max_over_mean_load", "dropped_fraction", "router_entropy", "gate_mass", "real_experts_per_token")
TRAIN_STATS = ("train_max_over_mean_load", "late_train_max_over_mean_load", "late_train_lm_loss")


def _metrics(run_dir: str) -> list[dict[str, Any]]:
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  # A resumed run logs again the steps after its last checkpoint: keep each step's last
  # record of each kind (training or evaluation), in step order.
  last = {(r["step"], "eval_loss" in r): r for r in records}
  return sorted(last.values(), key=lambda r: (r["step"], "eval_loss" in r))


def collect(variants: list[Variant], workdir: str) -> list[dict[str, Any]]:
  """One row per variant from its run_config.json and result.json (missing: status 'not run');
  rows with a run config also hold its training tokens (`train_tokens`, not a column)."""
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
                 train_flops_per_token=c.train_flops_per_token, status="started",
                 learning_rate=configs.train.learning_rate,
                 # Not a column: the budget axis of results pages (moe.research.budgets).
                 train_tokens=configs.train.steps * configs.data.batch_size * configs.data.seq_len)
    if os.path.exists(result_path):
      with open(result_path) as f:
        result = json.load(f)
      row.update(status=result["status"], step=result["step"], eval_loss=result.get("eval_loss"))
      for stat in STATS:
        values = result.get("layers", {}).get(stat)
        if values is not None:
          row[stat] = float(np.mean(values))  # mean over MoE layers
    # Training batches' max/mean load, mean over MoE layers and logged steps (all of them,
    # and the second half: balancing schemes differ most in how fast they settle).
    metrics = _metrics(run_dir)
    train_load = _load_curve(metrics)
    if train_load:
      row["train_max_over_mean_load"] = float(np.mean([v for _, v in train_load]))
      row["late_train_max_over_mean_load"] = float(np.mean(
          [v for step, v in train_load if step > train_load[-1][0] / 2]))
    # The language-model loss of the training batches over the last tenth of the steps (each
    # logged before its update): beside the validation loss it shows when a run that sees its
    # data again starts to fit the training split rather than the text.
    lm = [(r["step"], r["lm_loss"]) for r in metrics if "lm_loss" in r]
    if lm:
      row["late_train_lm_loss"] = float(np.mean([v for step, v in lm if step > 0.9 * lm[-1][0]]))
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


def _load_curve(metrics: list[dict[str, Any]]) -> list[tuple[int, float]]:
  return [(r["step"], float(np.mean(r["layers"]["max_over_mean_load"]))) for r in metrics
          if "loss" in r and "max_over_mean_load" in r.get("layers", {})]


def load_curve(run_dir: str) -> list[tuple[int, float]]:
  """[(step, max/mean expert load of the training batch, mean over MoE layers)]."""
  return _load_curve(_metrics(run_dir))


def eval_curves(variants: list[Variant], workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{variant: [(step, validation loss)]} from each run's metrics.jsonl."""
  curves = {}
  for v in variants:
    rows = _metrics(os.path.join(workdir, v.name))
    points = sorted({r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}.items())
    if points:
      curves[v.name] = points
  return curves


def bias_curves(run_dir: str, layer: int = 0) -> dict[str, list[tuple[int, float]]]:
  """{'expert i': [(step, selection bias)]} of one MoE layer of a topk_bias run."""
  points = [(r["step"], r["layers"]["score_bias"][layer]) for r in _metrics(run_dir)
            if "loss" in r and "score_bias" in r.get("layers", {})]
  if not points:
    return {}
  return {f"expert {i}": [(step, b[i]) for step, b in points] for i in range(len(points[0][1]))}


KEPT = (RUN_CONFIG, RESULT, EVAL_DOCS, "metrics.jsonl", "operative_config.gin")


def copy_run_files(workdir: str, dest: str) -> int:
  """Copies what a results page cites from every run under workdir (its learning-rate
  pilots included) to dest: configs, results, metrics, per-document losses, the sweeps'
  .results tables and learning_rates.json; no checkpoints or parameters. Returns the
  number of runs copied."""
  runs = 0
  for dirpath, dirnames, filenames in os.walk(workdir):
    dirnames[:] = sorted(d for d in dirnames if d not in ("checkpoints", "tensorboard"))
    rel = os.path.relpath(dirpath, workdir)
    in_results = any(part.endswith(".results") for part in rel.split(os.sep))
    keep = [f for f in filenames if in_results or f in KEPT or (rel == "." and f.endswith(".json"))]
    if not keep:
      continue
    os.makedirs(os.path.join(dest, rel), exist_ok=True)
    for f in keep:
      shutil.copy2(os.path.join(dirpath, f), os.path.join(dest, rel, f))
    runs += RESULT in keep
  return runs


def seed_summary(rows: list[dict[str, Any]], seed_key: str = "SEED") -> list[dict[str, Any]]:
  """Rows named 'model,SEED=s' (finished ones) grouped by model: seeds, mean validation loss,
  spread (max - min over seeds), std, and the routing statistics' means."""
  groups: dict[str, list[dict[str, Any]]] = {}
  for r in rows:
    parts = r["variant"].split(",")
    if r["status"] != "finished" or not any(p.startswith(seed_key + "=") for p in parts):
      continue
    groups.setdefault(",".join(p for p in parts if not p.startswith(seed_key + "=")), []).append(r)
  out = []
  for model, rs in groups.items():
    losses = np.array([r["eval_loss"] for r in rs])
    row = {"model": model, "seeds": len(rs), "mean": float(losses.mean()),
           "spread": float(losses.max() - losses.min()), "std": float(losses.std(ddof=1)) if len(rs) > 1 else None,
           "losses": losses.tolist()}
    for stat in STATS + TRAIN_STATS:
      values = [r[stat] for r in rs if r[stat] is not None]
      row[stat] = float(np.mean(values)) if values else None
    rates = sorted({r.get("learning_rate") for r in rs} - {None})
    row["learning_rate"] = "/".join(f"{x:g}" for x in rates) if rates else None
    out.append(row)
  return out


SUMMARY_COLUMNS = ["model", "seeds", "mean", "spread", "std", "losses", "gate_mass",
                   "max_over_mean_load", "train_max_over_mean_load", "late_train_max_over_mean_load",
                   "dropped_fraction", "learning_rate"]


def summary_markdown(summary: list[dict[str, Any]]) -> str:
  fmt = lambda v: "/".join(f"{x:.3f}" for x in v) if isinstance(v, list) else _fmt(v)
  lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
  lines += ["| " + " | ".join(fmt(r[c]) for c in SUMMARY_COLUMNS) + " |" for r in summary]
  return "\n".join(lines)


def write_results(rows: list[dict[str, Any]], workdir: str, out_dir: str,
                  curves: dict[str, list[tuple[int, float]]] | None = None, comparisons=(),
                  learning_rates: dict[str, Any] | None = None) -> tuple[str, str]:
  """out_dir/results.md and out_dir/results.csv (and results.png, the validation-loss
  curves, when given) for the runs under workdir; comparisons.md/.json for the declared
  comparisons [(A, B)], learning_rates.md for a learning-rate step's choice table
  (moe.research.lr_search); returns the table paths."""
  os.makedirs(out_dir, exist_ok=True)
  if comparisons:
    compare.write(rows, workdir, out_dir, comparisons)
  if learning_rates:
    with open(os.path.join(out_dir, "learning_rates.md"), "w") as f:
      f.write(lr_search.markdown(learning_rates) + "\n")
  if curves:
    plot_lines(os.path.join(out_dir, "results.png"), curves, "step", "validation loss",
               "validation loss during training")
  loads = {r["variant"]: load_curve(os.path.join(workdir, r["variant"])) for r in rows}
  loads = {k: v for k, v in loads.items() if v}
  if loads:
    plot_lines(os.path.join(out_dir, "load.png"), loads, "step", "max / mean expert load",
               "training batches' expert load (mean over MoE layers)", markers=False)
  for r in rows:
    bias = bias_curves(os.path.join(workdir, r["variant"]))
    if bias:
      plot_lines(os.path.join(out_dir, f"bias_{r['variant']}.png"), bias, "step",
                 "selection bias (logits)", f"{r['variant']}: MoE layer 0, one line per expert",
                 markers=False, legend=False)
  summary = seed_summary(rows)
  if summary:
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
      f.write(summary_markdown(summary) + "\n")
  md, csv_path = os.path.join(out_dir, "results.md"), os.path.join(out_dir, "results.csv")
  with open(md, "w") as f:
    f.write(markdown(rows) + "\n")
  with open(csv_path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  return md, csv_path
