"""A training run's parameters restored with the run's own configs (evaluation, analyses):
from abstract shapes straight into their shards on a mesh (or onto one device), without the
optimizer state. `load_run` / `load_hf_checkpoint`: a model with its tokenizer, from a run or
a released-format checkpoint directory (generation, lm-eval)."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from data.config import DataConfig
from moe.model.config import ModelConfig
from moe.model.decoder import Transformer
from moe.parallel.rules import state_shardings
from moe.train.checkpoint import CheckpointError, Checkpointer
from moe.train.final_params import flat_values, has_final_params, read_final_params
from moe.train.run_files import read_run_configs

# The model's entry of a checkpoint's state: nnx.to_pure_dict of the (model, optimizer)
# state (moe.train.state) is {0: model variables, 1: optimizer state}.
MODEL = 0


class RestoredRun(NamedTuple):
  model_cfg: ModelConfig
  data_cfg: DataConfig
  graphdef: Any   # of the model alone: nnx.merge(graphdef, params) is the Transformer
  params: Any     # nnx.State of the model's variables: parameters (and topk_bias's
                  # selection biases), no optimizer state
  step: int
  mesh: Mesh | None = None  # where params live (split by the rules); None: one device


def abstract_model(model_cfg: ModelConfig):
  """(graphdef, every model variable as ShapeDtypeStructs): nothing is allocated. Not only
  nnx.Param: a topk_bias model's selection biases (ScoreBias) route its tokens too."""
  model = nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0)))
  return nnx.split(model)


def _shardings(params, mesh: Mesh | None):
  """Where each variable goes: as the rules place it on `mesh`; None: this host's first device."""
  if mesh is None:
    one = SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: one, params)
  return state_shardings(params, mesh)


def restore_final_params(workdir: str, model_cfg: ModelConfig, step: int | None, mesh: Mesh | None):
  """(step, graphdef, params) from workdir/final_params.safetensors (moe.train.final_params),
  each variable put into its shards on `mesh` (None: one device); `step`, if given, must be
  the file's."""
  saved_step, arrays = read_final_params(workdir)
  if step is not None and step != saved_step:
    raise CheckpointError(f"{workdir!r} has no checkpoints, and its final parameters are of step "
                          f"{saved_step}, not {step}")
  graphdef, params = abstract_model(model_cfg)
  flat, where = flat_values(params), flat_values(_shardings(params, mesh))
  if set(flat) != set(arrays):
    raise CheckpointError(f"{workdir!r}: final parameters do not match the run's model config "
                          f"(missing {sorted(set(flat) - set(arrays))}, extra {sorted(set(arrays) - set(flat))})")
  for key, want in flat.items():
    if arrays[key].shape != want.shape:
      raise CheckpointError(f"{workdir!r}: final parameter {key} has shape {arrays[key].shape}, "
                            f"the model wants {want.shape}")
  for path, var in nnx.to_flat_state(params):
    key = "/".join(map(str, path))
    var.set_value(jax.device_put(arrays[key].astype(flat[key].dtype), where[key]))
  return saved_step, graphdef, params


def restore_params(ckpt: Checkpointer, model_cfg: ModelConfig, step: int | None,
                   mesh: Mesh | None):
  """(step, graphdef, params) of a checkpoint: each parameter read straight into its shards
  on `mesh` as the rules place it (None: onto this host's first device); the optimizer
  state and the data position are never read."""
  graphdef, params = abstract_model(model_cfg)
  shardings = _shardings(params, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nnx.to_pure_dict(params), nnx.to_pure_dict(shardings))
  step, restored = ckpt.restore_subtree(step, {MODEL: target})
  nnx.replace_by_pure_dict(params, restored[MODEL])
  return step, graphdef, params


def restore_run(workdir: str, step: int | None = None, mesh: Mesh | None = None) -> RestoredRun:
  """A training run's parameters at a checkpoint (default: the latest), with the run's own
  configs, on one device or in their shards on `mesh`; a run without a checkpoint directory,
  from its final parameters (final_params.safetensors) if it kept them."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir) and has_final_params(workdir):  # checkpoints dropped, run kept
    configs = read_run_configs(workdir)
    step, graphdef, params = restore_final_params(workdir, configs.model, step, mesh)
    return RestoredRun(configs.model, configs.data, graphdef, params, step, mesh)
  if not os.path.isdir(ckpt_dir):
    raise CheckpointError(f"no checkpoint directory {ckpt_dir!r}: is {workdir!r} a training workdir?")
  configs = read_run_configs(workdir)
  ckpt = Checkpointer(ckpt_dir, async_save=False)
  try:
    step, graphdef, params = restore_params(ckpt, configs.model, step, mesh)
  finally:
    ckpt.close()
  return RestoredRun(configs.model, configs.data, graphdef, params, step, mesh)


class Loaded(NamedTuple):
  cfg: ModelConfig
  graphdef: Any
  params: Any      # nnx.State of the model's Params
  tokenizer: Any   # data.text_tokenizer.TextTokenizer
  mesh: Mesh | None
  data_cfg: Any = None  # a training run's DataConfig (None for a checkpoint directory)


def load_run(workdir: str, step: int | None = None, mesh: Mesh | None = None,
             dtype: str | None = None) -> Loaded:
  """A training run's parameters (its latest checkpoint, or `step`) and SentencePiece
  tokenizer; `dtype` overrides the compute dtype (the parameters keep theirs)."""
  from data.input_pipeline import tokenizer_for
  from moe.decode.generate import graphdef_for

  run = restore_run(workdir, step, mesh)
  cfg, graphdef = run.model_cfg, run.graphdef
  if dtype and dtype != cfg.dtype:
    cfg = cfg.replace(dtype=dtype)
    graphdef = graphdef_for(cfg)
  return Loaded(cfg, graphdef, run.params, tokenizer_for(run.data_cfg), mesh, run.data_cfg)


def load_hf_checkpoint(directory: str, dtype: str = "bfloat16", mesh: Mesh | None = None) -> Loaded:
  """A released-format checkpoint directory (config.json, *.safetensors, tokenizer.json),
  parameters read straight into their shards on `mesh` in `dtype` (moe.hub's importer)."""
  from data.text_tokenizer import load_tokenizer
  from moe.hub.safetensors_import import import_checkpoint

  ckpt = import_checkpoint(directory, mesh, dtype)
  return Loaded(ckpt.model_cfg, ckpt.graphdef, ckpt.params, load_tokenizer(directory), mesh)
