"""Sweeps: one base config, named variants and/or a product of gin overrides, each run in
its own sub-workdir as a separate process (moe.research.sweep_results collects the table).

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

import dataclasses
import itertools
import json
import os
import shlex
import subprocess
import sys
from typing import Any

from moe.train.run_files import RESULT

_KEYS = {"base", "bindings", "variants", "product"}


class SweepError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  gin_files: tuple[str, ...]
  bindings: tuple[str, ...]
  args: tuple[str, ...] = ()  # further flags of experiments.train (e.g. --mesh=...)


def with_overrides(variants: list[Variant], gin_files=(), bindings=(), args=()) -> list[Variant]:
  """Every variant with sweep-wide gin files and bindings after its own (so they win over
  the sweep file's) and further training flags."""
  return [dataclasses.replace(v, gin_files=v.gin_files + tuple(gin_files),
                              bindings=v.bindings + tuple(bindings), args=v.args + tuple(args))
          for v in variants]


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
          *[f"--gin_bindings={b}" for b in variant.bindings], *variant.args]


def shell_command(variant: Variant, workdir: str) -> str:
  return " ".join(shlex.quote(a) for a in ["python", *command(variant, workdir)[1:]])


def is_finished(run_dir: str) -> bool:
  path = os.path.join(run_dir, RESULT)
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
