"""XLA:CPU's thread pool, sized so that simulated devices' collectives cannot starve it.

XLA:CPU sizes the pool that runs a program's operations to max(cores, CPU devices): "enough
threads for one collective" (xla/pjrt/cpu/cpu_client.cc), each device's share of a
collective blocking one pool thread until every participant arrives. But a device's
operations run as soon as their inputs are ready, so one device can hold several
collectives at once: a train step on `data:2,expert:4` with the dropless rounds hung with
10 collectives blocked on the 8 threads (six devices in a gradient all-reduce, four in an
all-gather of the layer loop), the devices they waited for having no thread left to reach
them. XLA reads the pool size from `NPROC` when the CPU backend starts; this module sets
it, before that, to THREADS_PER_DEVICE x the device count (idle threads cost nothing).

This module imports no JAX: `moe/__init__.py` calls `reserve_collective_threads()` before any
backend can start.
"""

from __future__ import annotations

import os
import re
from typing import MutableMapping

ENV_VAR = "NPROC"  # XLA's DefaultThreadPoolSize() reads it
THREADS_PER_DEVICE = 8


def forced_cpu_devices(environ: MutableMapping[str, str] = os.environ) -> int:
  """CPU devices this process will simulate: the last
  --xla_force_host_platform_device_count in XLA_FLAGS, else JAX_NUM_CPU_DEVICES, else 1."""
  counts = re.findall(r"--xla_force_host_platform_device_count=(\d+)", environ.get("XLA_FLAGS", ""))
  if counts:
    return int(counts[-1])
  value = environ.get("JAX_NUM_CPU_DEVICES", "")
  return int(value) if value.isdigit() else 1


def reserve_collective_threads(n_devices: int | None = None,
                               environ: MutableMapping[str, str] = os.environ) -> int | None:
  """Set NPROC to THREADS_PER_DEVICE x n_devices (default: forced_cpu_devices()), at least
  the core count, unless it is set already or there is one device. Only takes effect before
  JAX's CPU backend starts. Returns the pool size set, or None."""
  n = forced_cpu_devices(environ) if n_devices is None else n_devices
  if n <= 1 or environ.get(ENV_VAR):  # an empty NPROC means unset to XLA as well
    return None
  threads = max(os.cpu_count() or 1, THREADS_PER_DEVICE * n)
  environ[ENV_VAR] = str(threads)
  return threads
