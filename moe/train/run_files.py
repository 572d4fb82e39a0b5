"""The files a run keeps in its workdir besides checkpoints and metrics: the configs it
was started with (run_config.json, a guard against resuming another model's or data
stream's run), gin's operative config, how the last process ended (result.json, which
sweeps read), and, once it has finished, each held-out document's loss (eval_docs.npz,
moe.train.evaluate.document_losses) and its parameters (final_params.safetensors,
moe.train.final_params)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from typing import Any, NamedTuple

import gin
import jax
import numpy as np

from data.config import DataConfig
from moe.model.config import RENAMED_FIELDS, ModelConfig
from moe.train.checkpoint import CheckpointError
from moe.train.config import TrainConfig

RUN_CONFIG, RESULT = "run_config.json", "result.json"
EVAL_DOCS, FINAL_PARAMS = "eval_docs.npz", "final_params.safetensors"


def _write_json(path: str, obj: Any, **kwargs) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, **kwargs)
  os.replace(tmp, path)  # atomic: a reader never sees half a file


# DataConfig fields of earlier versions, dropped when read (the run can be evaluated; its
# data stream is not today's, so resuming it is refused).
RETIRED_DATA_FIELDS = ("materialize",)


def _upgraded(configs: dict[str, Any]) -> dict[str, Any]:
  """A recorded run's configs with renamed fields under their current names."""
  model, data = configs.get("model"), configs.get("data")
  if model:
    configs = dict(configs, model={RENAMED_FIELDS.get(k, k): v for k, v in model.items()})
  if data:
    configs = dict(configs, data={k: v for k, v in data.items() if k not in RETIRED_DATA_FIELDS})
  return configs


def _recorded(workdir: str) -> dict[str, Any] | None:
  """workdir's run_config.json (renamed fields upgraded), None if there is none."""
  path = os.path.join(workdir, RUN_CONFIG)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return _upgraded(json.load(f))


def run_configs_dict(model_cfg: ModelConfig, data_cfg: DataConfig,
                     train_cfg: TrainConfig) -> dict[str, Any]:
  return {"model": dataclasses.asdict(model_cfg), "data": dataclasses.asdict(data_cfg),
          "train": dataclasses.asdict(train_cfg)}


# What may change when a run resumes: how it is computed and logged, not the architecture
# or the data stream. (Every TrainConfig field may change: cadence, and more steps.)
RESUMABLE_CHANGES = {
    "model": ("name", "remat", "scan_layers", "dispatch_backend", "expert_capacity_factor",
              "expert_block_factor", "expert_exchange", "capacity_factor"),
    "data": ("eval_batches", "data_dir", "read_threads", "prefetch_batches"),
}


def check_run_configs(workdir: str, configs: dict[str, Any]) -> None:
  """Refuse a workdir whose recorded run has another architecture or data stream (fields
  outside RESUMABLE_CHANGES differ); a workdir without a record is fine."""
  saved = _recorded(workdir)
  if saved is None:
    return
  for part, free in RESUMABLE_CHANGES.items():
    old, new = saved.get(part, {}), configs[part]
    diff = sorted(k for k in set(old) | set(new) if k not in free and old.get(k) != new.get(k))
    if diff:
      raise CheckpointError(
          f"workdir {workdir!r} holds a run of a different {part} config (fields differ: {diff}); "
          f"use a new --workdir, or the same {part} config to resume it (on resume only "
          f"{list(free)} may change)")


def record_run_configs(workdir: str, configs: dict[str, Any]) -> None:
  """workdir/run_config.json: the configs the run last (re)started with, written once its
  setup (data, model, checkpoint restore) has succeeded."""
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, RUN_CONFIG), configs, indent=2, sort_keys=True, default=str)


class RunConfigs(NamedTuple):
  model: ModelConfig
  data: DataConfig
  train: TrainConfig


def read_run_configs(workdir: str) -> RunConfigs:
  """The configs record_run_configs recorded for workdir's run."""
  configs = _recorded(workdir)
  if configs is None:
    path = os.path.join(workdir, RUN_CONFIG)
    raise CheckpointError(f"{path!r} does not exist: is {workdir!r} a training workdir?")
  return RunConfigs(ModelConfig(**_tuples(configs["model"])), DataConfig(**_tuples(configs["data"])),
                    TrainConfig(**_tuples(configs["train"])))


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
  """JSON turned tuples into lists; frozen configs want them hashable again."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def write_operative_config(workdir: str) -> None:
  """workdir/operative_config.gin: gin's bindings as the run (last re-)started with them."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "operative_config.gin")
  with open(path + ".tmp", "w") as f:
    f.write(gin.operative_config_str())
  os.replace(path + ".tmp", path)  # a start killed while writing keeps the previous record


class RunResult(NamedTuple):
  step: int
  status: str  # 'finished', 'stopped' (stop_after_steps), 'preempted', 'nothing_to_do' (was finished)
  train_loss: float
  eval: dict[str, Any] | None  # eval_loss, eval_perplexity, layers
  unigram_entropy: float


def environment() -> dict[str, str]:
  """What the numbers depend on beyond the configs: the embedded corpus is this Python's
  standard library, so its version changes the data; JAX's changes the kernels."""
  return {"python": platform.python_version(), "jax": jax.__version__,
          "platform": jax.default_backend()}


def write_result(workdir: str, result: RunResult) -> None:
  """workdir/result.json: how the last process of the run ended (sweeps read it)."""
  record = {"step": result.step, "status": result.status, "train_loss": result.train_loss,
            "unigram_entropy": result.unigram_entropy, "environment": environment()}
  if result.eval:
    record.update(eval_loss=result.eval["eval_loss"], eval_perplexity=result.eval["eval_perplexity"],
                  layers={k: np.asarray(v).tolist() for k, v in result.eval["layers"].items()})
  _write_json(os.path.join(workdir, RESULT), record, indent=1)


def write_eval_docs(workdir: str, docs: dict[str, np.ndarray], step: int) -> None:
  """workdir/eval_docs.npz: the final evaluation's per-document summed loss ('loss'),
  scored tokens ('tokens') and token-id fingerprints ('fingerprint'), in the eval stream's
  document order (the same for every run of the same data config), and the step."""
  path = os.path.join(workdir, EVAL_DOCS)
  with open(path + ".tmp", "wb") as f:
    np.savez(f, step=np.int64(step), **docs)
  os.replace(path + ".tmp", path)


def read_eval_docs(workdir: str) -> dict[str, np.ndarray] | None:
  """workdir's eval_docs.npz as a dict of arrays; None if the run has none."""
  path = os.path.join(workdir, EVAL_DOCS)
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    return {k: f[k] for k in f.files}
