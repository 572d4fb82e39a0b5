"""The mesh search (moe.train.mesh_search): its layouts, and the reduced-depth estimate
scaled to full depth against a full compile, on v5p:2x2x1 with the TPU compiler."""

import jax
import pytest

from moe.model.presets import get_preset
from moe.parallel.mesh import MeshConfig, make_mesh
from moe.train import mesh_search
from moe.train.config import TrainConfig
from moe.train.plan import plan
from tests.capabilities import tpu_devices_or_skip

SLICE = "v5p:2x2x1"
CFG = get_preset("tiny_deepseekmoe").replace(n_routed_experts=16, n_layers=7, first_k_dense_replace=1,
                                              dtype="bfloat16", remat=True)


@pytest.fixture(autouse=True)
def default_precision():
  # The suite's "highest" matmul precision (conftest) asks splash's bf16 dots for f32
  # passes, which Mosaic rejects; a real run keeps the default.
  with jax.default_matmul_precision("default"):
    yield


def test_layouts_divide_what_they_shard():
  specs = list(mesh_search.layouts(CFG, 4))
  assert "fsdp:4,expert:1,tensor:1" in specs and "fsdp:1,expert:4,tensor:1" in specs
  assert "fsdp:1,expert:2,tensor:2" in specs
  for spec in specs:
    sizes = {k: int(v) for k, v in (part.split(":") for part in spec.split(","))}
    assert sizes["fsdp"] * sizes["expert"] * sizes["tensor"] == 4
    assert CFG.n_routed_experts % sizes["expert"] == 0 and CFG.n_heads % sizes["tensor"] == 0
  dense = get_preset("tiny_dense")
  assert all(",expert:1," in s for s in mesh_search.layouts(dense, 4))


def test_the_scaled_estimate_is_the_full_compiles():
  """Two reduced compiles (2 and 3 MoE layers) scaled to 6 give the 6-layer compile's step
  time and peak memory within 5%."""
  tpu_devices_or_skip(SLICE)
  spec, batch, seq = "fsdp:2,expert:2,tensor:1", 8, 512
  est = mesh_search.scaled(CFG, spec, SLICE, batch, seq)
  full = plan(CFG, TrainConfig(), make_mesh(MeshConfig(spec), tpu_devices_or_skip(SLICE)), batch, seq,
              generation="v5p")
  assert est.step_seconds == pytest.approx(full.speed.step_seconds, rel=0.05)
  assert est.peak_bytes == pytest.approx(full.peak_bytes, rel=0.05)
  assert est.mfu == pytest.approx(full.speed.mfu, rel=0.05)
  assert est.fits
