"""Device meshes and logical axis rules: where every parameter and activation lives.

Parameters carry logical axis names (`axes` metadata, e.g. ('layers', 'expert', 'embed',
'expert_mlp')); one rules table maps each logical name to mesh axes:

    mesh axes: data (pure data parallel), fsdp (data parallel, parameters sharded),
               expert (routed experts split; tokens too), tensor (FFN/heads split)

`MeshConfig.shape` ("data:2,expert:4", sizes multiply to the device count, one size may be
-1 to take the rest) builds the mesh; the MoE layer reads the active mesh (`use_mesh`) to
run expert parallelism with shard_map.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import gin
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe.trace_setting import TraceSetting

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # tokens are split over every non-tensor axis

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


class MeshError(ValueError):
  pass


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """shape: "axis:size,..." over MESH_AXES (missing axes have size 1); "" = no mesh (one
  device, no sharding)."""
  shape: str = ""

  def axis_sizes(self, n_devices: int) -> dict[str, int]:
    """{axis: size} for all MESH_AXES, checked against n_devices."""
    sizes = {name: 1 for name in MESH_AXES}
    seen = set()
    for part in filter(None, (p.strip() for p in self.shape.split(","))):
      name, _, size = part.partition(":")
      name = name.strip()
      if name not in MESH_AXES:
        raise MeshError(f"mesh {self.shape!r}: unknown axis {name!r}; axes are {MESH_AXES}")
      if name in seen:
        raise MeshError(f"mesh {self.shape!r}: axis {name!r} given twice")
      seen.add(name)
      try:
        sizes[name] = int(size)
      except ValueError:
        raise MeshError(f"mesh {self.shape!r}: size of {name!r} is {size!r}, not an integer "
                        f"(write e.g. 'data:2,expert:4')") from None
      if sizes[name] == 0 or sizes[name] < -1:
        raise MeshError(f"mesh {self.shape!r}: size of {name!r} must be positive (or -1 for the rest)")
    fill = [n for n, s in sizes.items() if s == -1]
    if len(fill) > 1:
      raise MeshError(f"mesh {self.shape!r}: only one axis may be -1, got {fill}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
      if n_devices % known:
        raise MeshError(f"mesh {self.shape!r}: {n_devices} devices do not divide by {known}")
      sizes[fill[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
      raise MeshError(f"mesh {self.shape!r} has {math.prod(sizes.values())} devices but "
                      f"{n_devices} are available; make the sizes multiply to {n_devices} "
                      f"(or use -1 for one axis)")
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh | None:
  """The mesh of cfg over `devices` (default: all), axes in MESH_AXES order; None if no shape."""
  if not cfg.shape:
    return None
  devices = list(jax.devices() if devices is None else devices)
  sizes = cfg.axis_sizes(len(devices))
  grid = np.array(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
  return Mesh(grid, MESH_AXES)


def axis_size(mesh: Mesh | None, name: str) -> int:
  return 1 if mesh is None else mesh.shape[name]


def spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
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
    return var.replace(NamedSharding(mesh, spec(_variable_axes(var), var.shape, mesh, name)))
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
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(logical, x.shape, mesh)))


# ---------------------------------------------------------------------------------------
# The active mesh, read at trace time by the model.

_MESH: TraceSetting[Mesh | None] = TraceSetting(None)


def active_mesh() -> Mesh | None:
  return _MESH.value


def use_mesh(mesh: Mesh | None):
  """Trace the model under this mesh (None: single device). Functions jitted inside see it."""
  return _MESH.use(mesh)
