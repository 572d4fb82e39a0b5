"""Skips that CI turns into failures. A test that needs something optional (the TPU
compiler, torch, the C++ kernel's compiler, a notebook kernel, lm-eval) skips where it is
missing, so the suite runs on a bare checkout; `MOE_REQUIRE` (a comma-separated list of CAPABILITIES,
or "all"; `.ci/run` sets it) makes that a failure instead, so a broken install cannot turn
dozens of tests into skips while CI stays green."""

from __future__ import annotations

import importlib
import os

import pytest

ENV_VAR = "MOE_REQUIRE"
CAPABILITIES = ("tpu_compiler", "torch", "cpu_kernel", "notebook", "lm_eval")


def required() -> set[str]:
  names = {n.strip() for n in os.environ.get(ENV_VAR, "").split(",") if n.strip()}
  unknown = names - set(CAPABILITIES) - {"all"}
  if unknown:
    raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: unknown {sorted(unknown)}; "
                     f"use some of {CAPABILITIES} or 'all'")
  return set(CAPABILITIES) if "all" in names else names


def skip_or_fail(capability: str, reason: str):
  """Skip the test for `reason`, or fail it when MOE_REQUIRE names `capability`."""
  assert capability in CAPABILITIES, capability
  if capability in required():
    pytest.fail(f"{capability} is required ({ENV_VAR}) but unavailable: {reason}", pytrace=False)
  pytest.skip(reason, allow_module_level=True)


def import_or_skip(module: str, capability: str):
  """The module, or a skip (a failure when MOE_REQUIRE names `capability`)."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    skip_or_fail(capability, f"could not import {module!r}: {e}")


def tpu_devices_or_skip(name: str, one_host: bool = False, slices: int = 1):
  """The abstract devices of TPU slice `name` (moe.parallel.topology.tpu_devices), or a skip."""
  from moe.parallel import topology

  try:
    return topology.tpu_devices(name, one_host, slices)
  except topology.TopologyError as e:
    skip_or_fail("tpu_compiler", str(e))
