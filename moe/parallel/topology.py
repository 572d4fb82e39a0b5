"""Abstract TPU slices for compiling without TPUs: with `jax[tpu]` installed (libtpu), the
TPU compiler runs on any host, and `tpu_devices("v5p:4x4x4")` gives that slice's devices
to build a Mesh over (moe.parallel.mesh.make_mesh(cfg, devices)). Programs lowered with
shardings on them compile with the real TPU compiler, Mosaic kernels included; nothing can
execute on them.

Names are `generation:shape`: v4:2x2x1, v5p:4x4x4, v5p:8x8x4 (chips in x, y, z), v5e:2x2,
v6e:4x4 (chips in x, y).
"""

from __future__ import annotations

import functools
import math
import os
import re

import jax

TOPOLOGY = re.compile(r"^(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})$")
# HBM per chip (GiB): what a plan's peak is compared with.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}


class TopologyError(ValueError):
  pass


def parse(name: str) -> tuple[str, int]:
  """'v5p:4x4x4' -> ('v5p', 64): the chip generation and the number of chips."""
  m = TOPOLOGY.match(name.strip())
  if not m:
    raise TopologyError(f"topology {name!r}: write generation:shape, e.g. v5p:4x4x4, v4:2x2x1, "
                        f"v5e:2x2 or v6e:4x4 (generations {sorted(HBM_GIB)})")
  return m.group(1), math.prod(int(n) for n in m.group(2).split("x"))


@functools.cache
def tpu_devices(name: str, one_host: bool = False, slices: int = 1) -> list:
  """The abstract devices of TPU slice `name` (one per chip), for compiling only.
  one_host: every chip on one host, as a single-host VM (v5e-8, v6e-8, Colab); libtpu's
  default host holds 2x2 chips (so it refuses 1x1 and makes v5e:2x4 two hosts).
  slices > 1: that many copies of the slice joined by the data-centre network, each device
  carrying its `slice_index`."""
  generation, chips = parse(name)
  chips *= slices
  # Compiling only: several processes (tests, plans) may load libtpu at once; without this
  # the second one fails on libtpu's lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies

    # v4's two TensorCores per chip act as one device (megacore), as JAX runs them on a v4;
    # the abstract topology would otherwise give a device per core.
    extra = {"chip_config_name": "megacore"} if generation == "v4" else {}
    if one_host:
      dims = [int(n) for n in name.split(":")[1].split("x")]
      extra["chips_per_host_bounds"] = tuple(dims + [1] * (3 - len(dims)))
    if slices > 1:
      extra["num_slices"] = slices
    devices = list(topologies.get_topology_desc(platform="tpu", topology_name=name, **extra).devices)
  except Exception as e:  # libtpu missing, or this libtpu does not know the slice
    raise TopologyError(f"topology {name!r}: the TPU compiler is not available here ({e!r}); "
                        f"install it with pip install 'jax[tpu]=={jax.__version__}'") from None
  if len(devices) != chips:
    raise TopologyError(f"topology {name!r} gave {len(devices)} devices, expected {chips}")
  return devices
