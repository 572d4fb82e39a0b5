"""A finished run's model variables, without optimizer state, in one safetensors file
(workdir/final_params.safetensors): parameters and any selection biases (topk_bias), each
under its path in the model's state ('stacks/0/blocks/ffn/w_gate', ...) in its own dtype,
with the step in the file's metadata. A third of a checkpoint's size (no Adam moments), so a
run can drop its checkpoints and still be analysed and evaluated: moe.train.restore reads
this file when the run has no checkpoint directory. Readable with numpy alone."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from moe.train.run_files import FINAL_PARAMS

FORMAT = "deepseekmoe-jax final params 1"


def flat_values(state: Any) -> dict[str, Any]:
  """{'a/b/c': value} of every variable of an nnx.State (the file's keys)."""
  return {"/".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(state)}


def save_final_params(workdir: str, model_state: Any, step: int) -> str:
  """workdir/final_params.safetensors from the model's nnx.State (one process: every array
  whole on this host); returns its path. Written to a temporary name, then renamed."""
  arrays = {k: np.ascontiguousarray(jax.device_get(v))
            for k, v in flat_values(model_state).items()}
  path = os.path.join(workdir, FINAL_PARAMS)
  save_file(arrays, path + ".tmp", metadata={"format": FORMAT, "step": str(step)})
  os.replace(path + ".tmp", path)
  return path


def has_final_params(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, FINAL_PARAMS))


def read_final_params(workdir: str) -> tuple[int, dict[str, np.ndarray]]:
  """(step, {path: host array}) of workdir/final_params.safetensors."""
  path = os.path.join(workdir, FINAL_PARAMS)
  with safe_open(path, "numpy") as f:
    meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
      raise ValueError(f"{path!r} is not a final-parameters file of this codebase (metadata {meta})")
    return int(meta["step"]), {k: f.get_tensor(k) for k in f.keys()}
