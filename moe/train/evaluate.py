"""Held-out evaluation: validation loss, perplexity and mean per-layer routing statistics,
of a live state or of a run's checkpoint."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from data.config import DataConfig
from data.input_pipeline import (Datasets, check_eval_batches, host_batch_size, make_datasets,
                                 padding_batch)
from moe.parallel.mesh import MeshConfig, make_mesh
from moe.parallel.rules import check_batch
from moe.train.metrics import token_weighted_mean
from moe.train.restore import restore_run
from moe.train.steps import Steps, make_steps, put_batch


def agree_eval_batches(data: Datasets, cfg: DataConfig) -> Datasets:
  """With several hosts, each host's eval batches padded with padding_batch (weight 0) to
  the most any host packed. Each eval step is one computation over every host's devices:
  a host that ran fewer steps would leave the others waiting in its collectives. The
  padding rows add nothing to the loss or the routing statistics (evaluate). One host:
  `data` as it is."""
  if jax.process_count() == 1:
    return data
  counts = multihost_utils.process_allgather(np.int32(len(data.eval_batches)))
  most = int(np.max(counts))
  check_eval_batches(most, cfg)  # a host without a batch of its own pads them all
  pad = padding_batch(host_batch_size(cfg.batch_size, jax.process_count()), cfg.seq_len)
  return data._replace(eval_batches=data.eval_batches + [pad] * (most - len(data.eval_batches)))


def evaluate(steps: Steps, state, batches) -> dict[str, Any]:
  """Weighted mean NLL over `batches` (eval_loss, nats/token), its perplexity, and the
  per-layer routing statistics of their real tokens (layers): each batch's statistics are
  of its real tokens (moe.model.loss.real_tokens), averaged with the batch's real tokens as
  weight, so padding, in a batch or as a whole batch (agree_eval_batches), counts nowhere."""
  total = count = 0.0
  layers, tokens = [], []
  for batch in batches:
    nll, n, stats, real = steps.eval(state, put_batch(batch, steps.mesh))
    total, count = total + float(nll), count + float(n)
    layers.append(jax.device_get(stats))
    tokens.append(float(real))
  loss = total / max(count, 1.0)
  return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
          "layers": token_weighted_mean(layers, tokens)}


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
  data.train.close()  # stops its reading threads: only the eval batches are used
  data = agree_eval_batches(data, data_cfg)
  out = evaluate(make_steps(run.graphdef, run.params, mesh), run.params, data.eval_batches)
  out.update(step=run.step, unigram_entropy=data.unigram_entropy)
  return out
