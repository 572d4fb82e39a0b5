"""Multi-host jobs (a TPU pod slice: one process per host)."""

from __future__ import annotations

import os

import jax


def initialize_distributed() -> None:
  """Join the other hosts of a multi-host job (a TPU pod slice: one process per host).

  Must run before anything else touches JAX. On Cloud TPU VMs the coordinator, process
  count and index are discovered from the environment; elsewhere set
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)
