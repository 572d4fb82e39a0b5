"""Sweeps: one base config, named variants and/or a product of gin overrides, each run in
its own sub-workdir; a results table collected from the runs.

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
axis (the binding's last component), joined by ','.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import shlex
import subprocess
import sys
from typing import Any

import numpy as np

from moe.config import ModelConfig
from moe.params import count_params

_KEYS = {"base", "bindings", "variants", "product"}


class SweepError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  gin_files: tuple[str, ...]
  bindings: tuple[str, ...]


def load_sweep(path: str) -> list[Variant]:
  """The variants of the sweep file at `path`, checked."""
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
  return out


def _strings(value: Any, path: str, what: str) -> list[str]:
  if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
    raise SweepError(f"sweep file {path!r}: {what!r} must be a list of strings")
  return value


def _gin_value(x: Any) -> str:
  return repr(x) if isinstance(x, str) else json.dumps(x)


def command(variant: Variant, workdir: str) -> list[str]:
  """The training command of one variant (what --print_commands prints)."""
  return [sys.executable, "-m", "experiments.train", f"--workdir={os.path.join(workdir, variant.name)}",
          *[f"--gin_file={f}" for f in variant.gin_files],
          *[f"--gin_bindings={b}" for b in variant.bindings]]


def shell_command(variant: Variant, workdir: str) -> str:
  return " ".join(shlex.quote(a) for a in ["python", *command(variant, workdir)[1:]])


def is_finished(run_dir: str) -> bool:
  path = os.path.join(run_dir, "result.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f).get("status") == "finished"


def run_sweep(variants: list[Variant], workdir: str, cwd: str | None = None, log=print) -> list[str]:
  """Runs unfinished variants one after another (each a fresh process); returns the names
  that failed. A failure is reported and the sweep goes on."""
  failed = []
  for v in variants:
    run_dir = os.path.join(workdir, v.name)
    if is_finished(run_dir):
      log(f"[{v.name}] finished earlier: skipped")
      continue
    log(f"[{v.name}] {shell_command(v, workdir)}")
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "sweep.log"), "a") as out:
      proc = subprocess.run(command(v, workdir), cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
      log(f"[{v.name}] FAILED (exit {proc.returncode}); see {os.path.join(run_dir, 'sweep.log')}")
      failed.append(v.name)
  return failed


# ---------------------------------------------------------------------------------------
# Results.

COLUMNS = ["variant", "status", "step", "total_params", "activated_params", "train_flops_per_token",
           "eval_loss", "max_over_mean_load", "dropped_fraction", "router_entropy"]


def collect(variants: list[Variant], workdir: str) -> list[dict[str, Any]]:
  """One row per variant from its run_config.json and result.json (missing: status 'not run')."""
  rows = []
  for v in variants:
    run_dir = os.path.join(workdir, v.name)
    row: dict[str, Any] = {c: None for c in COLUMNS}
    row.update(variant=v.name, status="not run")
    config_path, result_path = (os.path.join(run_dir, n) for n in ("run_config.json", "result.json"))
    if os.path.exists(config_path):
      with open(config_path) as f:
        configs = json.load(f)
      cfg = ModelConfig(**{k: tuple(x) if isinstance(x, list) else x for k, x in configs["model"].items()})
      c = count_params(cfg, configs["data"]["seq_len"])
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
    from moe.analysis import plot_lines
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
