"""A training run's checkpoint restored with the run's own configs (evaluation, analyses)."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from flax import nnx

from data.config import DataConfig
from moe.model.config import ModelConfig
from moe.train.checkpoint import CheckpointError, Checkpointer
from moe.train.run_files import read_run_configs
from moe.train.state import create_state


class RestoredRun(NamedTuple):
  model_cfg: ModelConfig
  data_cfg: DataConfig
  graphdef: Any
  state: Any  # (model, optimizer) state of the checkpoint
  step: int


def restore_run(workdir: str, step: int | None = None) -> RestoredRun:
  """A training run's checkpoint (default: the latest), with the run's own configs."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise CheckpointError(f"no checkpoint directory {ckpt_dir!r}: is {workdir!r} a training workdir?")
  configs = read_run_configs(workdir)
  graphdef, state = create_state(configs.model, configs.train)
  ckpt = Checkpointer(ckpt_dir, async_save=False)
  try:
    step, restored, _ = ckpt.restore(step, nnx.to_pure_dict(state))
  finally:
    ckpt.close()
  nnx.replace_by_pure_dict(state, restored)
  return RestoredRun(configs.model, configs.data, graphdef, state, step)
