"""Checkpoints: an orbax CheckpointManager holding the train state and the grain data
iterator's state (one small JSON file per host); a checkpoint that cannot be read is
named, and nothing on disk is changed."""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp
from grain.checkpoint import CheckpointRestore, CheckpointSave


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

  def save(self, step: int, state: Any, data: grain.DatasetIterator) -> None:
    """Saves `state` and the position of `data` (each host its own)."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=CheckpointSave(data)))

  def restore(self, step: int | None, abstract_state: Any,
              data: grain.DatasetIterator | None = None) -> tuple[int, Any]:
    """(step, state) of `step` (default: the latest), and `data` moved to its saved position
    when given. Names what it cannot read."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data is not None:
      items["data"] = CheckpointRestore(data)
    return self._read(step, items)

  def restore_subtree(self, step: int | None, abstract_subtree: dict[Any, Any]) -> tuple[int, Any]:
    """(step, entries of the saved state) for `step` (default: the latest): `abstract_subtree`
    is some of the state's entries (e.g. {0: model params} of (model, optimizer)) as
    ShapeDtypeStructs with shardings, each array read straight into its shards; nothing else
    is read, neither the rest of the state nor the data position. Names what it cannot read."""
    # PyTreeRestore reads StandardSave's format; StandardRestore has no partial restore.
    return self._read(step, {"state": ocp.args.PyTreeRestore(
        item=abstract_subtree, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_subtree))})

  def _read(self, step: int | None, items: dict[str, Any]) -> tuple[int, Any]:
    steps = self.steps()
    if step is None:
      if not steps:
        raise CheckpointError(f"no checkpoint in {self.directory!r}")
      step = steps[-1]
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory!r}; "
                            f"available steps: {steps}")
    try:
      # orbax reads a state directory whose files are gone (deleted, partly copied) as an
      # empty tree and reports a pytree mismatch; name the missing file instead.
      if not os.path.exists(os.path.join(self.path(step), "state", "_METADATA")):
        raise FileNotFoundError("state/_METADATA is missing: the checkpoint's arrays were "
                                "deleted or only partly copied")
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types for unreadable files
      earlier = [s for s in steps if s < step]
      detail = " ".join(f"{type(e).__name__}: {e}".split())
      detail = detail if len(detail) <= 300 else detail[:300] + "..."
      fallback = (f"the last earlier one is step {earlier[-1]} (evaluate it with --step={earlier[-1]}; "
                  f"move {self.path(step)!r} away to resume training from it)" if earlier
                  else "there is no earlier checkpoint")
      raise CheckpointError(f"checkpoint {self.path(step)!r} cannot be restored ({detail}). Nothing "
                            f"was changed on disk; {fallback}") from e
    return step, out["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
