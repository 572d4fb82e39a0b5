"""Fine-tuning from a released-format checkpoint directory (TrainConfig.init_from_hf): the
run's architecture is the checkpoint's config.json, its tokenizer the checkpoint's, and its
first parameters the checkpoint's, read into their shards (a fresh optimizer). A resumed
run reads its own checkpoint instead, like any run."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from data.config import DataConfig
from moe.hub.hf_config import config_from_hf
from moe.hub.safetensors_import import SafetensorsCheckpoint, abstract_params, stream_params
from moe.model.config import ModelConfig
from moe.train.restore import MODEL

# What a fine-tuning run takes from its own model config (gin's model_config): how it
# computes, not what; every other field comes from config.json.
COMPUTE_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers", "dispatch_backend",
                  "expert_capacity_factor", "expert_block_factor", "expert_exchange")


def finetune_configs(directory: str, model_cfg: ModelConfig,
                     data_cfg: DataConfig) -> tuple[ModelConfig, DataConfig]:
  """(model config of the checkpoint with model_cfg's COMPUTE_FIELDS, data config reading
  the checkpoint's tokenizer unless DataConfig.tokenizer_path names another)."""
  hf = SafetensorsCheckpoint(directory).hf_config
  name = os.path.basename(os.path.normpath(directory))
  cfg = config_from_hf(hf, name=name, **{f: getattr(model_cfg, f) for f in COMPUTE_FIELDS})
  if data_cfg.tokenizer_path is None:
    data_cfg = dataclasses.replace(data_cfg, tokenizer_path=directory)
  return cfg, data_cfg


def load_into_state(state: Any, directory: str, model_cfg: ModelConfig, mesh: Mesh | None) -> None:
  """Overwrite the model parameters of a (model, optimizer) state (moe.train.state) with
  the checkpoint's, one parameter at a time, each in the shards the state has."""
  _, params = abstract_params(model_cfg)
  variables = dict(nnx.to_flat_state(state[MODEL]))
  for path, array in stream_params(SafetensorsCheckpoint(directory), model_cfg, params, mesh):
    variables[path].set_value(array)
