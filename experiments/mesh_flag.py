"""The shared --mesh flag of training, evaluation and analyses."""

from __future__ import annotations

from experiments import common_flags
from moe.parallel.mesh import MeshConfig

_MESH = common_flags.mesh()


def mesh_flag() -> str | None:
  """--mesh as given (None when absent)."""
  return _MESH.value


def mesh_config() -> MeshConfig:
  """--mesh if given, else MeshConfig() as gin configures it (empty shape: one device)."""
  return MeshConfig(_MESH.value) if _MESH.value is not None else MeshConfig()
