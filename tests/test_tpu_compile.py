"""Every Pallas kernel, and the sharded train step with the TPU defaults, compiled by the
real TPU compiler (libtpu, from `jax[tpu]`) for abstract v5p and v4 slices on this CPU
host. Interpret mode cannot see Mosaic's layout rules (a one-row slice of a tiled VMEM
buffer compiled in interpret mode and failed on TPU); these tests can. Each checks that the
compiled program holds Mosaic calls (`tpu_custom_call`), so a fallback to XLA fails it.
Skipped, with the reason, where libtpu cannot load."""

import re

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
from tests.capabilities import tpu_devices_or_skip
from tests.data_fixtures import small_model

MOSAIC = "tpu_custom_call"
CHIPS = ["v5p:2x2x1", "v4:2x2x1"]


devices = tpu_devices_or_skip


def on_chip(name, *shapes):
  """ShapeDtypeStructs (shape, dtype) on the slice's first chip."""
  sh = SingleDeviceSharding(devices(name)[0])
  return [jax.ShapeDtypeStruct(s, d, sharding=sh) for s, d in shapes]


def kernels(text: str) -> list[str]:
  """The names of the Mosaic calls in compiled HLO text; each carries the name of the jitted
  function it came from (gmm, tgmm, gather_rows, combine_rows, splash_...)."""
  return re.findall(r"%(\S+) = [^\n]*custom_call_target=\"" + MOSAIC + r"\"", text)


def count(names: list[str], kernel: str) -> int:
  return sum(kernel in n and not (kernel == "gmm" and "tgmm" in n) for n in names)


def compiled_kernels(fn, args, n_diff: int) -> list[str]:
  """fn's value and gradient in its first n_diff args (the value keeps the forward kernels
  live), compiled: the Mosaic calls."""
  text = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(n_diff)))).lower(*args).compile().as_text()
  assert MOSAIC in text
  return kernels(text)


def sq(x):
  return jnp.sum(jnp.square(x.astype(jnp.float32)))


# (tokens T, d_model, experts E, expert width f, K'): widths under a lane tile (128), and
# DeepSeekMoE-16B's layer.
SHAPES = {"small": (256, 64, 8, 96, 2), "16b": (4096, 2048, 64, 1408, 6)}
DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}
# Both dtypes at both shapes on v5p; on v4 the 16B shape in bf16 only (the training dtype;
# f32 at 16B costs ~15 s more and exercises no other tiling).
KERNEL_CASES = [(c, s, d) for c in CHIPS for s in sorted(SHAPES) for d in sorted(DTYPES)
                if c == CHIPS[0] or s == "small" or d == "bf16"]


@pytest.mark.parametrize("chip, shape, dtype", KERNEL_CASES)
def test_grouped_matmul_forward_and_backward_compile(chip, shape, dtype):
  t, d, e, f, k = SHAPES[shape]
  dt = DTYPES[dtype]
  lhs, rhs, sizes = on_chip(chip, ((t * k, d), dt), ((e, d, f), dt), ((e,), jnp.int32))
  names = compiled_kernels(lambda a, b, gs: sq(ops.gmm(a, b, gs)), (lhs, rhs, sizes), 2)
  # gmm forward, gmm by the transposed weights (d lhs), tgmm (d rhs)
  assert count(names, "gmm") == 2 and count(names, "tgmm") == 1, names


@pytest.mark.parametrize("chip, shape, dtype", KERNEL_CASES)
def test_permute_and_combine_forward_and_backward_compile(chip, shape, dtype):
  t, d, _, _, k = SHAPES[shape]
  dt = DTYPES[dtype]
  x, y, order, gates = on_chip(chip, ((t, d), dt), ((t * k, d), dt), ((t * k,), jnp.int32), ((t, k), dt))
  loss = lambda x, y, g, o: sq(ops.combine(ops.permute(x, o, k) * y, o, g))
  names = compiled_kernels(loss, (x, y, gates, order), 3)
  # permute and combine; the VJPs: combine's gather (of d_out, for d y and d gates),
  # permute's combine
  assert count(names, "gather_rows") == 2 and count(names, "combine_rows") == 2, names


def test_dropless_layer_on_one_chip_runs_the_kernels():
  """The single-device dropless layer with dispatch "pallas": sort, Pallas gather, gmm,
  Pallas combine, forward and backward."""
  t, d, e, f, k = SHAPES["small"]
  x, gates, idx, wg, wu, wd = on_chip("v5p:2x2x1", ((t, d), jnp.bfloat16), ((t, k), jnp.bfloat16),
                                      ((t, k), jnp.int32), ((e, d, f), jnp.bfloat16),
                                      ((e, d, f), jnp.bfloat16), ((e, f, d), jnp.bfloat16))
  backend = registry.get("pallas")
  loss = lambda x, g, wg, wu, wd, i: sq(backend.routed(x, i, g, (wg, wu, wd)))
  names = compiled_kernels(loss, (x, gates, wg, wu, wd, idx), 5)
  assert count(names, "gmm") >= 6 and count(names, "tgmm") == 3, names
  assert count(names, "gather_rows") >= 2 and count(names, "combine_rows") >= 2, names


# (slice, mesh, expert capacity factor): dropless on four chips of FSDP; dropless expert
# parallelism (rounds: XLA moves rows, the backend's gmm multiplies); capacity expert
# parallelism (the backend's gather and combine too).
STEPS = [("v5p:2x2x1", "fsdp:4", 0.0), ("v5p:2x2x1", "fsdp:2,expert:2", 0.0),
         ("v4:2x2x1", "fsdp:2,expert:2", 1.5)]


@pytest.mark.parametrize("chip, layout, capacity", STEPS)
def test_sharded_train_step_with_the_tpu_defaults_compiles(chip, layout, capacity):
  """A small DeepSeekMoE's full train step (forward, backward, AdamW) on a 4-chip slice with
  every default left to "auto": dispatch and attention resolve to Pallas (gmm, splash)
  because the mesh is a TPU's."""
  mesh = make_mesh(MeshConfig(layout), devices(chip))
  cfg = small_model(n_routed_experts=8, expert_width=128).replace(
      d_model=128, dtype="bfloat16", expert_capacity_factor=capacity)
  assert cfg.dispatch_backend == "auto"
  # seq 128: one splash block. The suite's "highest" matmul precision (conftest) would ask
  # splash's bf16 dots for f32 passes, which Mosaic rejects; a real run keeps the default.
  with jax.default_matmul_precision("default"):
    compiled, *_ = compile_step(cfg, TrainConfig(), mesh, batch=8, seq_len=128)
  names = kernels(compiled.as_text())
  # Per MoE layer: gate, up and down forward; their d lhs (gmm) and d rhs (tgmm).
  assert count(names, "gmm") >= 6 and count(names, "tgmm") >= 3, names
  assert count(names, "splash") >= 3, names  # forward, dq, dkv
  if capacity:
    assert count(names, "gather_rows") >= 1 and count(names, "combine_rows") >= 1, names
  mem = compiled.memory_analysis()
  assert 0 < mem.temp_size_in_bytes < 2**30
