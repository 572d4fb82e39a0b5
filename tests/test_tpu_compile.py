"""Every Pallas kernel, and the sharded train step with the TPU defaults, compiled by the
real TPU compiler (libtpu, from `jax[tpu]`) for abstract v5p and v4 slices on this CPU
host. Interpret mode cannot see Mosaic's layout rules (a one-row slice of a tiled VMEM
buffer compiled in interpret mode and failed on TPU); these tests can. Each checks that the
compiled program holds Mosaic calls (`tpu_custom_call`), so a fallback to XLA fails it.
Skipped, with the reason, where libtpu cannot load."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import SingleDeviceSharding

from moe.dispatch import registry
from moe.parallel import topology
from moe.parallel.mesh import MeshConfig, make_mesh
from moe.train.config import TrainConfig
from moe.train.plan import compile_step
from pallas_kernels import ops
from tests.data_fixtures import small_model

MOSAIC = "tpu_custom_call"
CHIPS = ["v5p:2x2x1", "v4:2x2x1"]


def devices(name):
  try:
    return topology.tpu_devices(name)
  except topology.TopologyError as e:
    pytest.skip(str(e))


def on_chip(name, *shapes):
  """ShapeDtypeStructs (shape, dtype) on the slice's first chip."""
  sh = SingleDeviceSharding(devices(name)[0])
  return [jax.ShapeDtypeStruct(s, d, sharding=sh) for s, d in shapes]


def compiled_text(fn, args) -> str:
  return jax.jit(fn).lower(*args).compile().as_text()


# (tokens T, d_model, experts E, expert width f, K'): a small shape and DeepSeekMoE-16B's layer.
SHAPES = {"small": (256, 128, 8, 128, 2), "16b": (4096, 2048, 64, 1408, 6)}


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_grouped_matmul_forward_and_backward_compile(chip, shape):
  t, d, e, f, k = SHAPES[shape]
  lhs, rhs, sizes = on_chip(chip, ((t * k, d), jnp.bfloat16), ((e, d, f), jnp.bfloat16), ((e,), jnp.int32))
  loss = lambda a, b, g: jnp.sum(ops.gmm(a, b, g).astype(jnp.float32))
  text = compiled_text(jax.grad(loss, argnums=(0, 1)), (lhs, rhs, sizes))
  assert text.count(MOSAIC) >= 2  # gmm for d lhs and tgmm for d rhs


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_permute_and_combine_forward_and_backward_compile(chip, dtype):
  t, d, _, _, k = SHAPES["16b"]
  x, y, order, gates = on_chip(chip, ((t, d), dtype), ((t * k, d), dtype), ((t * k,), jnp.int32),
                               ((t, k), dtype))
  loss = lambda x, y, o, g: jnp.sum(ops.combine(ops.permute(x, o, k) * y, o, g).astype(jnp.float32))
  text = compiled_text(jax.grad(loss, argnums=(0, 1, 3)), (x, y, order, gates))
  assert text.count(MOSAIC) >= 4  # permute, combine, and the gathers of their VJPs


def test_dropless_layer_on_one_chip_runs_the_kernels():
  """The single-device dropless layer with dispatch "pallas": sort, Pallas gather, gmm,
  Pallas combine, forward and backward."""
  t, d, e, f, k = SHAPES["small"]
  x, gates, idx, wg, wu, wd = on_chip("v5p:2x2x1", ((t, d), jnp.bfloat16), ((t, k), jnp.bfloat16),
                                      ((t, k), jnp.int32), ((e, d, f), jnp.bfloat16),
                                      ((e, d, f), jnp.bfloat16), ((e, f, d), jnp.bfloat16))
  backend = registry.get("pallas")
  loss = lambda x, g, i, *w: jnp.sum(backend.routed(x, i, g, w).astype(jnp.float32))
  text = compiled_text(jax.grad(loss, argnums=(0, 1, 3, 4, 5)), (x, gates, idx, wg, wu, wd))
  assert text.count(MOSAIC) >= 6


@pytest.mark.parametrize("chip, layout", [("v5p:2x2x1", "fsdp:2,expert:2"), ("v4:2x2x1", "fsdp:4")])
def test_sharded_train_step_with_the_tpu_defaults_compiles(chip, layout):
  """A small DeepSeekMoE's full train step (forward, backward, AdamW) on a 4-chip slice with
  every default left to "auto": dispatch and attention resolve to Pallas (gmm, splash)
  because the mesh is a TPU's."""
  mesh = make_mesh(MeshConfig(layout), devices(chip))
  cfg = small_model(n_routed_experts=8, expert_width=128).replace(d_model=128, dtype="bfloat16")
  assert cfg.dispatch_backend == "auto"
  # seq 128: one splash block. The suite's "highest" matmul precision (conftest) would ask
  # splash's bf16 dots for f32 passes, which Mosaic rejects; a real run keeps the default.
  with jax.default_matmul_precision("default"):
    compiled, *_ = compile_step(cfg, TrainConfig(), mesh, batch=8, seq_len=128)
  text = compiled.as_text()
  assert text.count(MOSAIC) >= 4  # splash forward and backward, gmm, tgmm
  mem = compiled.memory_analysis()
  assert 0 < mem.temp_size_in_bytes < 2**30
