"""Logical axis rules: where every parameter and activation lives on a mesh.

Parameters carry logical axis names (`axes` metadata, e.g. ('layers', 'expert', 'embed',
'expert_mlp')); one table, RULES, maps each logical name to mesh axes. Optimizer state
inherits its parameter's axes.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe.parallel.mesh import BATCH_AXES, MeshError, active_mesh

# logical axis name -> mesh axis (or axes, or None = replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "length": None,
    "act_embed": None,   # activations' model dimension stays whole
    "embed": "fsdp",     # parameters' model dimension: FSDP (ZeRO-3) sharding
    "vocab": "tensor",      # the LM head's output columns
    "embed_vocab": None,    # the embedding table's rows: a row gather from a split table is slow
    "heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "expert": "expert",
    "expert_mlp": "tensor",
    "layers": None,
}



def partition_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
         what: str = "array") -> P:
  """PartitionSpec of an array with these logical axes under RULES, checked to divide."""
  out = []
  for name, size in zip(logical, shape):
    mesh_axes = RULES.get(name) if name is not None else None
    if name is not None and name not in RULES:
      raise MeshError(f"{what}: logical axis {name!r} has no sharding rule; rules: {sorted(RULES)}")
    axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    n = math.prod(mesh.shape[a] for a in axes)
    if size % n:
      raise MeshError(f"{what}: dimension {name!r} of size {size} does not divide over mesh "
                      f"axes {axes} of size {n}; change the mesh or the model size")
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def _variable_axes(var: nnx.Variable) -> tuple[str | None, ...]:
  axes = var.get_metadata().get("axes")
  return tuple(axes) if axes is not None else (None,) * len(var.shape)


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """The NamedSharding of every variable of an nnx state (parameters and optimizer state,
  which inherits its parameter's axes); variables without axes (step counts) replicate."""
  def one(path, var):
    name = jax.tree_util.keystr(path)
    return var.replace(NamedSharding(mesh, partition_spec(_variable_axes(var), var.shape, mesh, name)))
  return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, seq] inputs: batch split over BATCH_AXES."""
  return NamedSharding(mesh, P(BATCH_AXES, None))


def check_batch(mesh: Mesh | None, batch_size: int, what: str = "batch size") -> None:
  """The global batch must split evenly over the batch axes (and over hosts)."""
  if mesh is None:
    return
  n = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if batch_size % n or batch_size % jax.process_count():
    raise MeshError(f"{what}={batch_size} does not split over the {n} batch shards of mesh "
                    f"{dict(mesh.shape)} (axes {BATCH_AXES}) and {jax.process_count()} hosts; "
                    f"use a multiple of {math.lcm(n, jax.process_count())}")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical axes under the active mesh (no-op without one)."""
  mesh = active_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, partition_spec(logical, x.shape, mesh)))
