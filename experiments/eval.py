"""Evaluate a checkpoint: validation loss, perplexity and per-layer routing statistics.

  python -m experiments.eval --workdir=workdirs/tiny_deepseekmoe [--step=200]
  python -m experiments.eval --workdir=... --gin.DataConfig.eval_batches=64
  python -m experiments.eval --workdir=... --mesh=fsdp:4,expert:2   # parameters in shards

The run's own model and data configs are used; DataConfig bindings override the data
config's fields, `--mesh` (or MeshConfig.shape) restores the parameters in their shards
onto a mesh and evaluates there, and bindings of anything else are refused.
"""

from __future__ import annotations

import gin
import numpy as np
from absl import app, flags, logging

from data.config import DataConfig
from experiments import gin_flags
from experiments.mesh_flag import mesh_config
from moe.cache import enable_compile_cache
from moe.model.presets import model_config
from moe.parallel.mesh import MeshError
from moe.train.config import TrainConfig
from moe.train.evaluate import evaluate_checkpoint

_WORKDIR = flags.DEFINE_string("workdir", None, "a training run's directory", required=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")


def format_report(out: dict) -> str:
  lines = [f"step {out['step']}: validation loss {out['eval_loss']:.4f} nats/token, "
           f"perplexity {out['eval_perplexity']:.2f} (unigram entropy {out['unigram_entropy']:.4f})"]
  layers = out["layers"]
  if layers:
    lines.append("layer  max/mean load  router entropy  dropped  expert balance")
    for i in range(len(layers["max_over_mean_load"])):
      lines.append(f"{i:5d}  {layers['max_over_mean_load'][i]:13.3f}  {layers['router_entropy'][i]:14.3f}"
                   f"  {layers['dropped_fraction'][i]:7.3f}  {layers['expert_balance_loss'][i]:14.4f}")
    lines.append("expert load (fraction of assignments), one row per MoE layer:")
    lines.extend("  " + " ".join(f"{x:.3f}" for x in np.asarray(row)) for row in layers["load"])
  return "\n".join(lines)


def main(argv):
  gin_flags.parse(argv)
  fixed = {c.__name__: sorted(gin.get_bindings(c)) for c in (model_config, TrainConfig)
           if gin.get_bindings(c)}
  if fixed:
    raise app.UsageError(f"gin bindings {fixed} do not apply: a checkpoint is evaluated with its run's "
                         f"own model; only DataConfig (and MeshConfig, or --mesh) may be set")
  logging.set_verbosity(logging.WARNING)
  enable_compile_cache()
  overrides = gin.get_bindings(DataConfig)
  if overrides:
    print(f"DataConfig overrides on top of the run's: {overrides}")
  mesh_cfg = mesh_config()
  if mesh_cfg.shape:
    print(f"mesh: {mesh_cfg.shape}")
  try:
    out = evaluate_checkpoint(_WORKDIR.value, _STEP.value, overrides, mesh_cfg)
  except MeshError as e:
    raise SystemExit(f"bad mesh: {e}") from None
  print(format_report(out))


if __name__ == "__main__":
  app.run(main, flags_parser=gin_flags.flags_parser)
