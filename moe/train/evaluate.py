"""Held-out evaluation: validation loss, perplexity and mean per-layer routing statistics,
of a live state or of a run's checkpoint."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from data.input_pipeline import make_datasets
from moe.parallel.mesh import MeshConfig, make_mesh
from moe.parallel.rules import check_batch
from moe.train.restore import restore_run
from moe.train.steps import Steps, make_steps, put_batch


def evaluate(steps: Steps, state, batches) -> dict[str, Any]:
  """Weighted mean NLL over `batches` (eval_loss, nats/token), its perplexity, and the
  per-layer routing statistics averaged over batches (layers)."""
  total = count = 0.0
  layers = []
  for batch in batches:
    nll, n, stats = steps.eval(state, put_batch(batch, steps.mesh))
    total, count = total + float(nll), count + float(n)
    layers.append(stats)
  loss = total / max(count, 1.0)
  mean_layers = jax.tree.map(lambda *a: np.mean(np.stack(a), axis=0), *layers) if layers else {}
  return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "layers": mean_layers}


def evaluate_checkpoint(workdir: str, step: int | None = None,
                        data_overrides: dict[str, Any] | None = None,
                        mesh_cfg: MeshConfig | None = None) -> dict[str, Any]:
  """Restore a checkpoint's parameters of workdir (default: the latest) with the run's own
  model config and evaluate them on the held-out split of the run's data config, with
  `data_overrides` (DataConfig fields, e.g. {'eval_batches': 32}) applied on top; on one
  device, or with the parameters in their shards on the mesh of `mesh_cfg`."""
  mesh = make_mesh(mesh_cfg) if mesh_cfg is not None else None
  run = restore_run(workdir, step, mesh)
  data_cfg = dataclasses.replace(run.data_cfg, **(data_overrides or {}))
  check_batch(mesh, data_cfg.batch_size, "DataConfig.batch_size")
  # Each host reads its own documents, as in training.
  data = make_datasets(data_cfg, run.model_cfg.vocab_size, jax.process_index(), jax.process_count())
  out = evaluate(make_steps(run.graphdef, run.params, mesh), run.params, data.eval_batches)
  out.update(step=run.step, unigram_entropy=data.unigram_entropy)
  return out
