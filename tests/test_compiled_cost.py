"""The TPU compiler's per-instruction cost model read from compiled modules
(moe.parallel.compiled_cost) and the plan's speed columns built on it: FLOPs known by hand,
loops counted by their trip counts, collectives' bytes and overlap. Compiles for the
abstract v5p:2x2x1 slice (skipped without libtpu, failed under MOE_REQUIRE)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe.model.counts import count_params
from moe.model.presets import get_preset
from moe.parallel import compiled_cost as cc, hlo_text
from moe.parallel.mesh import MeshConfig, make_mesh
from moe.train.config import TrainConfig
from moe.train.plan import plan
from tests.capabilities import tpu_devices_or_skip

SLICE = "v5p:2x2x1"


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(tpu_devices_or_skip(SLICE)), ("d",))


def spec(mesh, shape, *axes):
  return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, P(*axes)))


def test_a_matmul_costs_its_flops(mesh):
  """[2048, 8192] x [8192, 8192] per chip: 2 M K N FLOPs exactly, and a time no faster than
  the chip's peak allows nor far from it (a large bf16 matmul runs near peak)."""
  compiled = jax.jit(lambda a, b: a @ b).lower(spec(mesh, (4 * 2048, 8192), "d", None),
                                                spec(mesh, (8192, 8192))).compile()
  cost = cc.estimate(compiled.as_text(), "v5p", cc.scope_component(()))
  flops = 2 * 2048 * 8192 * 8192
  assert cost.flops == flops
  at_peak = flops / cc.PEAK_FLOPS["v5p"]
  assert at_peak <= cost.total <= 1.5 * at_peak, (cost.total, at_peak)
  assert not cost.collectives and not cost.unestimated


def test_loops_count_every_trip_and_scopes_name_components(mesh):
  """A scanned MLP of L layers: cost_analysis() counts the loop body once; the estimate
  counts L trips (FLOPs exact: forward, and both gradients of every layer), so doubling L
  doubles the time spent in the named scope."""
  def loss(x, ws):
    def layer(x, w):
      with jax.named_scope("mlp"):
        return jnp.tanh(x @ w), None
    return jax.lax.scan(layer, x, ws)[0].astype(jnp.float32).sum()

  costs = {}
  for n in (2, 4):
    compiled = jax.jit(jax.grad(loss, argnums=1)).lower(
        spec(mesh, (4 * 1024, 1024), "d", None), spec(mesh, (n, 1024, 1024))).compile()
    costs[n] = cc.estimate(compiled.as_text(), "v5p", cc.scope_component(("mlp",)))
    assert costs[n].flops == 3 * 2 * 1024**3 * n
    assert costs[n].collectives[("all-reduce", "sync")] == n  # each layer's weight gradient
  assert costs[4].seconds["mlp"] == pytest.approx(2 * costs[2].seconds["mlp"], rel=0.02)


def test_an_all_to_all_sends_its_share(mesh):
  def exchange(x):
    with jax.named_scope("dispatch"):
      return jax.lax.all_to_all(x, "d", 0, 0, tiled=True)

  fn = jax.jit(jax.shard_map(exchange, mesh=mesh, in_specs=P("d"), out_specs=P("d")))
  compiled = fn.lower(spec(mesh, (4 * 4096, 1024), "d", None)).compile()
  cost = cc.estimate(compiled.as_text(), "v5p", cc.scope_component(("dispatch",)))
  per_chip = 4096 * 1024 * 2
  assert cost.collective_bytes == {"all-to-all": per_chip * 3 / 4}  # 3 of 4 shards leave
  assert cost.seconds["exchange"] == pytest.approx(per_chip * 3 / 4 / (cc.ICI_BYTES_PER_S["v5p"] / 2))


_ASYNC = """HloModule m, is_scheduled=true, num_partitions=4

ENTRY %main (p: bf16[1024]) -> bf16[1024] {
  %p = bf16[1024]{0} parameter(0)
  %all-to-all-start = (bf16[1024]{0}, bf16[1024]{0}) all-to-all-start(%p), replica_groups={{0,1,2,3}}
  %f1 = bf16[1024]{0} fusion(%p), kind=kLoop, calls=%c, backend_config={"window_config":{"estimated_cycles":"%CYCLES%"}}
  %all-to-all-done = bf16[1024]{0} all-to-all-done(%all-to-all-start)
  ROOT %f2 = bf16[1024]{0} fusion(%all-to-all-done), kind=kLoop, calls=%c, backend_config={"window_config":{"estimated_cycles":"100"}}
}
"""


@pytest.mark.parametrize("cycles", [1, 10**9])
def test_an_asynchronous_collective_hides_behind_what_runs_before_its_done(cycles):
  """Scheduled module text by hand: 2 KiB to 4 chips sent while a fusion of `cycles` runs;
  exposed = the exchange's time less that fusion's, never below zero."""
  cost = cc.estimate(_ASYNC.replace("%CYCLES%", str(cycles)), "v5p", cc.scope_component(()))
  sent = 2048 * 3 / 4
  wire = sent / (cc.ICI_BYTES_PER_S["v5p"] / 2)
  compute = cycles / cc.CLOCK_HZ["v5p"]
  assert cost.collectives == {("all-to-all", "async"): 1}
  assert cost.overlapped_seconds == pytest.approx(min(wire, compute))
  assert cost.seconds["exchange"] == pytest.approx(max(wire - compute, 0.0))


@pytest.mark.parametrize("groups, size", [("replica_groups={{0,1},{2,3}}", 2),
                                          ("replica_groups=[2,2]<=[4]", 2),
                                          ("replica_groups=mesh['a'=2,'b'=4] {'b'}", 4),
                                          ("replica_groups={}", 8)])
def test_group_sizes_in_each_spelling(groups, size):
  ins = hlo_text.Instruction("ar", "all-reduce", "f32[8]", f"%ar = f32[8] all-reduce(%x), {groups}")
  assert hlo_text.group_size(ins, 8) == size


def test_the_plans_speed_columns_on_a_dense_model_counted_by_hand():
  """A 2-layer dense model on v5p:2x2x1 (fsdp:4): model FLOPs are 6 x (the matmul parameters
  a token uses, counted here by hand) x tokens + 12 L d S x tokens, over 4 chips; the
  compiled step does those matmuls plus the remat recompute of each layer's forward."""
  cfg = get_preset("tiny_dense").replace(n_layers=2, remat=True)
  devices = tpu_devices_or_skip(SLICE)
  mesh = make_mesh(MeshConfig("fsdp:4"), devices)
  batch, seq = 8, 256
  p = plan(cfg, TrainConfig(), mesh, batch, seq, generation="v5p")
  d, f, v, L = cfg.d_model, cfg.dense_ffn_width, cfg.vocab_size, cfg.n_layers
  # q, k, v, o; SwiGLU; two RMSNorm scales a layer; the final norm and the LM head.
  per_token = L * (4 * d * d + 3 * d * f + 2 * d) + d + d * v
  assert count_params(cfg, seq).train_flops_per_token == 6 * per_token + 12 * L * d * seq
  tokens = batch * seq / 4
  s = p.speed
  assert s.model_flops == pytest.approx((6 * per_token + 12 * L * d * seq) * tokens)
  # The compiled matmuls: each layer's projections and FFN forward (2 FLOPs per parameter
  # and token) and backward (4), and under remat the forward again (2: the compiler may
  # keep some of it); the LM head's forward and backward (6). Splash's score and value
  # kernels carry no estimate: not counted.
  layer_params = L * (4 * d * d + 3 * d * f)
  no_remat, all_remat = ((n * layer_params + 6 * d * v) * tokens for n in (6, 8))
  assert no_remat < s.compiled_flops <= all_remat, (no_remat, s.compiled_flops, all_remat)
  assert s.step_seconds >= s.compiled_flops / cc.PEAK_FLOPS["v5p"]
  assert s.tokens_per_sec == pytest.approx(tokens / s.step_seconds)
  assert s.mfu == pytest.approx(s.model_flops / s.step_seconds / cc.PEAK_FLOPS["v5p"])
  assert math.isclose(sum(s.seconds.values()), s.step_seconds)
  # The model's named scopes name the components, through autodiff and remat.
  assert {"attention", "dense_ffn", "lm_head_loss", "optimizer", "embedding"} <= set(s.seconds)
  assert s.seconds["dense_ffn"] > s.seconds["optimizer"]


_LOOPS = """HloModule m, is_scheduled=true, num_partitions=1

%cond_counted (p: (s32[], bf16[8])) -> pred[] {
  %p = (s32[], bf16[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %seven = s32[] constant(7)
  ROOT %lt = pred[] compare(%i, %seven), direction=LT
}

%cond_data (p: (s32[], s32[], bf16[8])) -> pred[] {
  %p = (s32[], s32[], bf16[8]{0}) parameter(0)
  %zero = s32[] constant(8)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] get-tuple-element(%p), index=1
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], bf16[8])) -> (s32[], bf16[8]) {
  %p = (s32[], bf16[8]{0}) parameter(0)
  ROOT %f = bf16[8]{0} fusion(%p), kind=kLoop, calls=%c, backend_config={"window_config":{"estimated_cycles":"1000"}}
}

ENTRY %main (x: bf16[8]) -> bf16[8] {
  %x = bf16[8]{0} parameter(0)
  %w1 = (s32[], bf16[8]{0}) while(%x), condition=%cond_counted, body=%body
  ROOT %w2 = (s32[], s32[], bf16[8]{0}) while(%x), condition=%cond_data, body=%body
}
"""


def test_a_counted_loop_runs_its_bound_and_a_data_dependent_one_once():
  """The dropless rounds' loop compares its counter with a computed count, not a constant
  (an unrelated constant in its condition must not be read as its bound)."""
  cost = cc.estimate(_LOOPS, "v5p", cc.scope_component(()))
  assert cost.total == pytest.approx((7 + 1) * 1000 / cc.CLOCK_HZ["v5p"])
  twice = cc.estimate(_LOOPS, "v5p", cc.scope_component(()), loop_trips=lambda ins: 2)
  assert twice.total == pytest.approx((7 + 2) * 1000 / cc.CLOCK_HZ["v5p"])


_WINDOWED = """HloModule m, is_scheduled=true, num_partitions=1

%fused (a: bf16[4096,2048,1], b: bf16[2048,16,128]) -> bf16[4096,16,128] {
  %a = bf16[4096,2048,1]{0,1,2} parameter(0)
  %b = bf16[2048,16,128]{2,0,1} parameter(1)
  ROOT %c = bf16[4096,16,128]{2,0,1} convolution(%a, %b), window={size=16 pad=15_15 rhs_reversal=1}, dim_labels=bf0_i0o->b0f
}

ENTRY %main (x: bf16[4096,2048,1], w: bf16[2048,16,128]) -> bf16[4096,16,128] {
  %x = bf16[4096,2048,1]{0,1,2} parameter(0)
  %w = bf16[2048,16,128]{2,0,1} parameter(1)
  ROOT %f = bf16[4096,16,128]{2,0,1} fusion(%x, %w), kind=kOutput, calls=%fused
}
"""


def test_a_matmul_written_as_a_padded_window_counts_its_real_taps():
  """The TPU compiler writes [4096, 2048] x [2048, 16 heads x 128] as a window of 16 over a
  dimension of 1 padded by 15 each side: one tap per output lands on data, so the FLOPs are
  the matmul's, not 16 times them."""
  cost = cc.estimate(_WINDOWED, "v5p", cc.scope_component(()))
  assert cost.flops == 2 * 4096 * 2048 * 16 * 128
