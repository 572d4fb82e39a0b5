"""No accelerator probing on a machine without one: with `jax[tpu]` installed (libtpu, for
compiling against abstract TPU slices), JAX's first device query loads libtpu, which prints
lines of errors about TPU hostnames on a machine with no TPU. A script that finds no
accelerator on the PCI bus, and was told no platform, runs on the CPU backend directly."""

from __future__ import annotations

import glob
import os

# PCI vendor ids: Google (TPU), NVIDIA, AMD.
ACCELERATOR_VENDORS = {"0x1ae0", "0x10de", "0x1002"}


def has_accelerator(sysfs: str = "/sys/bus/pci/devices") -> bool:
  """Whether a TPU or GPU is on the PCI bus (True where the bus cannot be read: then JAX
  is left to look for itself)."""
  paths = glob.glob(os.path.join(sysfs, "*", "vendor"))
  if not paths:
    return True
  for path in paths:
    try:
      with open(path) as f:
        if f.read().strip().lower() in ACCELERATOR_VENDORS:
          return True
    except OSError:
      return True
  return False


def cpu_unless_accelerator(sysfs: str = "/sys/bus/pci/devices") -> bool:
  """Select JAX's CPU backend when no platform was chosen (JAX_PLATFORMS, jax_platforms)
  and there is no accelerator; before any device query. Returns whether it did."""
  import jax

  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or has_accelerator(sysfs):
    return False
  jax.config.update("jax_platforms", "cpu")
  return True
