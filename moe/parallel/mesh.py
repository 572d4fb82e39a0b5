"""Device meshes: four named axes, a mesh from "axis:size,..." and the active mesh.

    mesh axes: data (pure data parallel), fsdp (data parallel, parameters sharded),
               expert (routed experts split; tokens too), tensor (FFN/heads split)

`MeshConfig.shape` ("data:2,expert:4", sizes multiply to the device count, one size may be
-1 to take the rest) builds the mesh; the MoE layer reads the active mesh (`use_mesh`) to
run expert parallelism with shard_map.

Several slices (devices carrying a `slice_index`, joined by the data-centre network, DCN):
the data axis spans them and everything else stays inside one slice. `data` splits into
(slices, data // slices), the outer factor across slices, so only the gradient reduction
crosses the DCN (moe.parallel.slices measures it in a compiled step); each slice keeps the
layout one slice alone would get.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import gin
import jax
import numpy as np
from jax.sharding import Mesh

from moe.scoped import ScopedValue

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # tokens are split over every non-tensor axis


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


def slice_of(device) -> int:
  """The slice a device belongs to: its `slice_index` (CPU/GPU devices have none: 0)."""
  return getattr(device, "slice_index", None) or 0


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh | None:
  """The mesh of cfg over `devices` (default: all), axes in MESH_AXES order; None if no shape.
  Devices from several slices: the data axis's outer factor runs over the slices (in
  slice_index order) and each slice's devices, in the order given, take the layout one slice
  would; a mesh that would put any other axis across slices is a MeshError."""
  if not cfg.shape:
    return None
  devices = list(jax.devices() if devices is None else devices)
  sizes = cfg.axis_sizes(len(devices))
  slices = sorted({slice_of(d) for d in devices})
  if len(slices) == 1:
    grid = np.array(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)
  n = len(slices)
  per_slice = [[d for d in devices if slice_of(d) == s] for s in slices]
  if len({len(p) for p in per_slice}) > 1:
    raise MeshError(f"mesh {cfg.shape!r}: the {n} slices hold different numbers of devices "
                    f"({[len(p) for p in per_slice]}); give every slice the same count")
  if sizes["data"] % n:
    others = {a: sizes[a] for a in MESH_AXES[1:] if sizes[a] > 1}
    raise MeshError(
        f"mesh {cfg.shape!r} over {n} slices of {len(per_slice[0])} devices would put "
        f"{'/'.join(others) or 'an axis'} across slices: only the data axis may span slices "
        f"(the data-centre network should carry the gradient reduction only), so data must "
        f"be a multiple of {n} (it is {sizes['data']}) and the other axes "
        f"({','.join(f'{a}:{s}' for a, s in others.items())}) must fit in one slice")
  inner = [sizes["data"] // n] + [sizes[a] for a in MESH_AXES[1:]]
  grid = np.concatenate([np.array(p, dtype=object).reshape(inner) for p in per_slice], axis=0)
  return Mesh(grid, MESH_AXES)


def axis_size(mesh: Mesh | None, name: str) -> int:
  return 1 if mesh is None else mesh.shape[name]


# The active mesh, read at trace time by the model.
_MESH: ScopedValue[Mesh | None] = ScopedValue(None)


def active_mesh() -> Mesh | None:
  return _MESH.current


def use_mesh(mesh: Mesh | None):
  """Trace the model under this mesh (None: single device). Functions jitted inside see it."""
  return _MESH.bound_to(mesh)


def target_platform(mesh: Mesh | None = None) -> str:
  """The platform a program is traced for: its mesh's devices' ("tpu" for an abstract TPU
  slice compiled from a CPU host, moe.parallel.topology), else JAX's default backend. What
  "auto" backends choose by."""
  mesh = active_mesh() if mesh is None else mesh
  return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
