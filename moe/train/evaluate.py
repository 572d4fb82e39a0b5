"""Held-out evaluation: validation loss, perplexity and mean per-layer routing statistics,
of a live state or of a run's checkpoint; each held-out document's loss (paired
comparisons of runs, moe.research.stats), kept with the final parameters when a run ends."""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from data.config import DataConfig
from data.input_pipeline import (Datasets, check_eval_batches, host_batch_size, make_datasets,
                                 padding_batch)
from moe.parallel.mesh import MeshConfig, make_mesh
from moe.parallel.rules import check_batch
from moe.train.final_params import save_final_params
from moe.train.metrics import token_weighted_mean
from moe.train.restore import restore_run
from moe.train.run_files import EVAL_DOCS, FINAL_PARAMS, write_eval_docs
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


def evaluate(steps: Steps, state, batches, token_nll: bool = False) -> dict[str, Any]:
  """Weighted mean NLL over `batches` (eval_loss, nats/token), its perplexity, and the
  per-layer routing statistics of their real tokens (layers): each batch's statistics are
  of its real tokens (moe.model.loss.real_tokens), averaged with the batch's real tokens as
  weight, so padding, in a batch or as a whole batch (agree_eval_batches), counts nowhere.
  token_nll: also 'token_nll', each batch's [B, S] weighted NLL per position (host arrays)."""
  total = count = 0.0
  layers, tokens, nlls = [], [], []
  for batch in batches:
    nll, n, stats, real, positions = steps.eval(state, put_batch(batch, steps.mesh))
    total, count = total + float(nll), count + float(n)
    layers.append(jax.device_get(stats))
    tokens.append(float(real))
    if token_nll:
      nlls.append(np.asarray(jax.device_get(positions)))
  loss = total / max(count, 1.0)
  out = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
         "layers": token_weighted_mean(layers, tokens)}
  if token_nll:
    out["token_nll"] = nlls
  return out


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


def split_documents(batches, nlls, eos_id: int) -> dict[str, np.ndarray]:
  """Per-position weighted NLLs of the eval batches -> per held-out document: 'loss' (summed
  NLL), 'tokens' (scored positions) and 'fingerprint' (CRC32 of its token ids in the
  batches). The eval batches are one stream of documents, each ending with EOS, packed row
  after row (data.packing): a document is every real token after one EOS up to the next,
  whichever rows it spans, numbered in stream order (the same for every run of one data
  config). A position's loss is of the document its input token belongs to."""
  cat = lambda key: np.concatenate([np.asarray(b[key]).reshape(-1) for b in batches])
  real = cat("segment_ids") > 0
  inputs, weights = cat("inputs")[real], cat("weights")[real].astype(np.float64)
  nll = np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in nlls])[real]
  eos = inputs == eos_id
  doc = np.cumsum(eos) - eos  # EOS tokens before each token: its document's index
  n = int(doc[-1]) + 1 if len(doc) else 0
  starts = np.searchsorted(doc, np.arange(n + 1))
  prints = [zlib.crc32(inputs[a:b].astype(np.int32).tobytes()) for a, b in zip(starts[:-1], starts[1:])]
  return {"loss": np.bincount(doc, nll, minlength=n), "tokens": np.bincount(doc, weights, minlength=n),
          "fingerprint": np.array(prints, np.uint32)}


def document_losses(steps: Steps, state, batches, eos_id: int) -> dict[str, np.ndarray]:
  """Each held-out document's summed loss and scored tokens over `batches` (split_documents),
  for a live (model, optimizer) state or a model's parameters; one process only."""
  return split_documents(batches, evaluate(steps, state, batches, token_nll=True)["token_nll"], eos_id)


def keep_final_files(workdir: str, steps: Steps, graphdef, state, batches, eos_id: int, step: int,
                     overwrite: bool = True, token_nll: list[np.ndarray] | None = None) -> None:
  """What a finished run keeps beside its checkpoints: final_params.safetensors (the model's
  variables, no optimizer state) and eval_docs.npz (each document's loss over the eval
  batches: from `token_nll`, the final evaluation's per-position losses, or evaluated
  again). overwrite=False writes only the missing ones (a finished run started again).
  Several processes: neither (their checkpoints hold the parameters)."""
  if jax.process_count() > 1:
    return
  if overwrite or not os.path.exists(os.path.join(workdir, FINAL_PARAMS)):
    save_final_params(workdir, nnx.split(nnx.merge(graphdef, state)[0])[1], step)
  if overwrite or not os.path.exists(os.path.join(workdir, EVAL_DOCS)):
    docs = (split_documents(batches, token_nll, eos_id) if token_nll is not None
            else document_losses(steps, state, batches, eos_id))
    write_eval_docs(workdir, docs, step)
