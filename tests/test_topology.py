"""Abstract TPU slices (moe.parallel.topology): names, device counts, the platform "auto"
backends choose by, and experiments.plan compiling with the real TPU compiler. Skipped,
with the reason, where libtpu cannot load."""

import json
import os
import subprocess
import sys

import pytest

from moe.dispatch import registry
from moe.parallel import topology
from moe.parallel.mesh import MeshConfig, make_mesh, target_platform
from tests.capabilities import tpu_devices_or_skip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


devices_or_skip = tpu_devices_or_skip


@pytest.mark.parametrize("name, chips", [("v5p:2x2x1", 4), ("v4:2x2x1", 4), ("v5e:2x2", 4),
                                         ("v6e:2x4", 8), ("v5p:4x4x4", 64)])
def test_a_slice_has_one_device_per_chip(name, chips):
  assert topology.parse(name) == (name.split(":")[0], chips)
  devices = devices_or_skip(name)
  assert len(devices) == chips and len({d.id for d in devices}) == chips
  assert {d.platform for d in devices} == {"tpu"}


@pytest.mark.parametrize("name", ["v5p", "v3:2x2", "v5p:2x2x1x1", "tpu:4"])
def test_bad_topology_names_are_refused_by_name(name):
  with pytest.raises(topology.TopologyError, match="generation:shape"):
    topology.parse(name)


def test_auto_backends_choose_by_the_meshs_platform():
  mesh = make_mesh(MeshConfig("fsdp:4"), devices_or_skip("v5p:2x2x1"))
  assert target_platform(mesh) == "tpu"
  assert registry.default_name(target_platform(mesh)) == registry.AUTO["tpu"] == "pallas"
  assert target_platform(None) == "cpu"  # no mesh active: JAX's default backend


def test_plan_compiles_with_the_tpu_compiler(tmp_path):
  devices_or_skip("v5p:2x2x1")
  out = tmp_path / "plan.jsonl"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.plan", "--topology=v5p:2x2x1", "--preset=tiny_deepseekmoe",
       "--mesh=fsdp:4", "--dispatch=fused", "--seq_len=128", f"--json_out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "XLA_FLAGS": ""})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "the TPU compiler for v5p:2x2x1" in proc.stdout and "v5p: yes" in proc.stdout
  row = json.loads(out.read_text())
  assert row["topology"] == "v5p:2x2x1" and row["n_devices"] == 4 and row["tokens_per_device"] == 128
  assert 0 < row["temp_bytes"] < row["peak_bytes"] < 2**30
