"""Checkpoints: an orbax CheckpointManager holding the train state and the data iterator's
position; a checkpoint that cannot be read is named, and nothing on disk is changed."""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  pass


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
