"""Checkpoints: orbax CheckpointManager holding train state, data-iterator state and the
run's configs; a workdir guard so a run never resumes into another model's checkpoints."""

from __future__ import annotations

import json
import os
from typing import Any

import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  pass


def config_guard(workdir: str, configs: dict[str, Any], write: bool = True) -> None:
  """Record the run's configs in workdir/run_config.json (if `write`: the first host of a
  multi-host job); refuse a workdir of another model."""
  path = os.path.join(workdir, "run_config.json")
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("model") != configs["model"]:
      diff = sorted(k for k in set(saved.get("model", {})) | set(configs["model"])
                    if saved.get("model", {}).get(k) != configs["model"].get(k))
      raise CheckpointError(
          f"workdir {workdir!r} holds a run of a different model config (fields differ: {diff}); "
          f"use a new --workdir, or the same model config to resume it")
    return
  if not write:
    return
  os.makedirs(workdir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(configs, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def load_run_configs(workdir: str) -> dict[str, Any]:
  """The configs config_guard recorded for workdir's run."""
  path = os.path.join(workdir, "run_config.json")
  if not os.path.exists(path):
    raise CheckpointError(f"{path!r} does not exist: is {workdir!r} a training workdir?")
  with open(path) as f:
    return json.load(f)


class Checkpointer:
  """Async saves every N steps, keeps the last `keep`; restores state and data position."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_names=("state", "data"),
    )

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state)))

  def restore(self, step: int | None, abstract_state: Any) -> tuple[int, Any, dict[str, Any]]:
    """(step, state, data_state) of `step` (default: the latest). Names what it cannot read."""
    steps = self.steps()
    if step is None:
      if not steps:
        raise CheckpointError(f"no checkpoint in {self.directory!r}")
      step = steps[-1]
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory!r}; "
                            f"available steps: {steps}")
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for unreadable files
      earlier = [s for s in steps if s < step]
      raise CheckpointError(
          f"checkpoint {self.path(step)!r} cannot be restored ({type(e).__name__}: {e}). "
          f"Nothing was changed on disk; earlier checkpoints: {earlier}. Move the broken "
          f"directory away to resume from an earlier one") from e
    return step, out["state"], dict(out["data"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
