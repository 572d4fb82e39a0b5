"""The serving programs (lm-eval's scoring, the Decoder's prefill and decode step) compiled by
the real TPU compiler for abstract single-host slices, bf16 parameters, abstract shapes only
(moe.train.inference_plan; the 16B table in docs/decode.md comes from the same functions).
Skipped, with the reason, where libtpu cannot load."""

import math

import jax
from flax import nnx
import pytest

from moe.model.decoder import Transformer
from moe.model.presets import get_preset
from moe.parallel import rules
from moe.train import inference_plan as ip
from moe.train.plan import per_device_bytes
from tests.capabilities import tpu_devices_or_skip
from tests.data_fixtures import small_model

GIB = 2**30


def model():
  """16B's structure, small: a dense first layer, then MoE layers of 8 experts, 2 active."""
  return small_model(n_routed_experts=8, n_activated_experts=2, expert_width=128, d_model=128,
                     n_layers=3, first_k_dense_replace=1, max_seq_len=256)


def compiled(slice_name: str, mesh_spec: str | None, batch: int):
  tpu_devices_or_skip(slice_name, one_host=True)
  cfg = model()
  mesh = ip.slice_mesh(cfg, slice_name, mesh_spec)
  # The suite's "highest" matmul precision (conftest) would ask splash's bf16 dots for f32
  # passes, which Mosaic rejects; serving keeps the default.
  with jax.default_matmul_precision("default"):
    programs = ip.compile_programs(cfg, mesh, slice_name.split(":")[0], batch, seq_len=128)
  return cfg, mesh, {p.name: p for p in programs}


@pytest.mark.parametrize("slice_name, mesh_spec, batch", [
    ("v5e:2x4", None, 8),                  # the rule's layout: expert:8
    ("v5p:2x2x1", "expert:2,tensor:2", 4),  # heads (and the cache) over tensor too
])
def test_serving_programs_compile_for_a_slice(slice_name, mesh_spec, batch):
  cfg, mesh, got = compiled(slice_name, mesh_spec, batch)
  assert set(got) == set(ip.PROGRAMS)
  if mesh_spec is None:
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1}
  for p in got.values():
    assert p.batch == batch and p.param_bytes > 0
    assert 0 < p.temp_bytes and p.param_bytes <= p.argument_bytes <= p.peak_bytes < GIB
    assert p.estimated_seconds > 0 and p.compile_seconds > 0
  # The KV cache per chip: B x positions x layers x (keys, values) x heads x head_dim x 2
  # bytes (bf16), split over the batch shards and the tensor shards of the heads.
  shards = ip.batch_unit(mesh) * mesh.shape["tensor"]
  cache = batch * cfg.max_seq_len * cfg.n_layers * 2 * cfg.n_heads * cfg.head_dim * 2 // shards
  assert got["prefill"].cache_bytes == got["decode_step"].cache_bytes == cache
  assert got["score"].cache_bytes == 0
  # Prefill and decode step write the cache in place (donated): the output aliases it.
  step = got["decode_step"]
  assert step.argument_bytes >= step.param_bytes + cache
  assert step.alias_bytes >= cache and got["prefill"].alias_bytes >= cache
  # bf16 parameters: every chip's shards of them, from their shardings.
  assert got["score"].param_bytes == step.param_bytes
  # Scoring and prefill run the TPU defaults (dispatch auto = Pallas gmm; scoring's 128-row
  # attention is splash); the decode step's MoE is the few_tokens backend, which under
  # expert parallelism multiplies with its gmm, tiled_gmm's XLA loops: no Mosaic gmm.
  assert got["score"].kernels.get("gmm", 0) >= 3 and got["score"].kernels.get("splash", 0) >= 1
  assert got["prefill"].kernels.get("gmm", 0) >= 3 and "splash" not in got["prefill"].kernels
  assert "gmm" not in step.kernels
  assert "tiled_gmm" in ip.decode_dispatch(mesh)
  if mesh.shape["expert"] > 1:
    assert any(k.startswith("all-to-all") for k in step.collectives), step.collectives
  assert 0 < step.expert_read_bytes and 0 < step.hbm_bound_seconds


def test_bf16_parameters_per_chip():
  """16B's abstract parameters in bf16 on the rule's v5e:2x4 layout (expert:8): each chip
  holds an eighth of the routed experts (and router columns) and everything else whole, 2
  bytes a parameter."""
  tpu_devices_or_skip("v5e:2x4", one_host=True)
  cfg = ip.serving_config(get_preset("deepseekmoe_16b"))
  assert cfg.dtype == cfg.param_dtype == "bfloat16"
  mesh = ip.slice_mesh(cfg, "v5e:2x4")
  _, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  leaves = jax.tree_util.tree_leaves_with_path(params)
  assert {str(a.dtype) for _, a in leaves} == {"bfloat16"}
  names = lambda path: {str(getattr(p, "key", getattr(p, "name", p))) for p in path}
  # Routed experts and the router's expert columns split over `expert`.
  split = sum(math.prod(a.shape) for path, a in leaves if names(path) & {"experts", "router"})
  total = sum(math.prod(a.shape) for _, a in leaves)
  expected = 2 * (split // 8 + total - split)
  assert per_device_bytes(params, rules.state_shardings(params, mesh)) == expected
  assert 6.0 < expected / GIB < 6.3  # of 30.5 GiB (16.4B parameters)


def test_serving_mesh_rule():
  cfg = get_preset("deepseekmoe_16b")
  assert ip.serving_mesh(cfg, 8) == "expert:8,tensor:1"
  assert ip.serving_mesh(cfg, 4) == "expert:4,tensor:1"
  assert ip.serving_mesh(cfg.replace(n_routed_experts=60), 8) == "expert:4,tensor:2"


def _fake(peak_at, refuse_over=None):
  """compile_at for largest_batch: one program of peak_at(b) bytes (refused past refuse_over)."""
  calls = []

  def compile_at(b):
    calls.append(b)
    if refuse_over is not None and b > refuse_over:
      raise ip.Refused("out of memory")
    return [ip.Program("decode_step", b, 1, 0, 0, 0, 0, peak_at(b), 0.0, 0.0, {}, {}, {}, 0.0)]
  return compile_at, calls


def test_largest_batch_extrapolates_and_checks():
  compile_at, calls = _fake(lambda b: 6 * GIB + b * GIB // 10)  # 16 GiB at b = 100
  fit = ip.largest_batch(compile_at, 8, 16 * GIB)
  assert fit.batch == 96 and calls == [8, 16, 96]
  # Growing faster than linear: the first extrapolation is over, the next one fits.
  compile_at, calls = _fake(lambda b: 6 * GIB + b * GIB // 10 + b * b * GIB // 2000)
  fit = ip.largest_batch(compile_at, 8, 16 * GIB)
  assert calls == [8, 16, 88, 64, 72] and fit.batch == 72  # 80 would need 16.8 GiB
  # Refused past 40: halfway back from each refusal.
  compile_at, calls = _fake(lambda b: 6 * GIB + b * GIB // 10, refuse_over=40)
  fit = ip.largest_batch(compile_at, 8, 16 * GIB)
  assert calls == [8, 16, 96, 56, 32] and fit.batch == 32 and isinstance(fit.compiled[96], str)
  # Not even the smallest batch fits.
  compile_at, _ = _fake(lambda b: 17 * GIB)
  assert ip.largest_batch(compile_at, 8, 16 * GIB).batch == 0
  # Refused naming the compiler's HBM (under the chip's: it reserves some): extrapolated to it.
  def named(b):
    if 6 + b / 10 > 15.5:
      raise ip.Refused(f"Ran out of memory in memory space hbm. Used {6 + b / 10:.2f}G of 15.50G hbm.")
    return [ip.Program("score", b, 1, 0, 0, 0, 0, 6 * GIB + b * GIB // 10, 0.0, 0.0, {}, {}, {}, 0.0)]
  fit = ip.largest_batch(named, 8, 16 * GIB)
  assert sorted(fit.compiled) == [8, 16, 88, 96] and fit.batch == 88 and fit.limit == 15.5 * GIB
  assert ip.compiler_capacity("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                              "required for HLO temporaries (95.78G) exceeds available HBM "
                              "(95.74G).") == 95.74 * GIB
