"""Benchmark MoE dispatch paths against the dense limit; prints a table.

  python -m experiments.bench_moe                     # layer: one row per dispatch path
  python -m experiments.bench_moe --model             # train step: tiny DeepSeekMoE vs dense
  python -m experiments.bench_moe --json_out=bench.json

The dense limit is a dense SwiGLU whose width is the layer's activated width (shared +
K' routed experts): a MoE layer cannot do its activated FLOPs faster than one dense
matmul does. ratio_to_dense is forward+backward time over the dense limit's. The limit, the
shared experts and the floors run the dense SwiGLU the model runs on this platform
(ModelConfig.ffn_backend "auto": on CPU the C++ kernel, moe.model.cpu_swiglu).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from data.input_pipeline import random_batch
from experiments import common_flags, errors
from experiments.timing import Path, Row, format_table, measure, time_ms, write_json
from moe.dispatch import cpu_kernel, registry
from moe.model import layers, moe_layer, routers
from moe.model.config import ModelConfig
from moe.model.presets import get_preset

common_flags.layer_shape_flags()
_INTERPRET = flags.DEFINE_integer("interpret_tokens", 256,
                                   "tokens for the interpret-mode Pallas row, which is timed against "
                                   "its own dense limit at that size (0: skip; it is slow)")
PATHS = ("fused", "cpu_ffi", "tiled", "floor", "capacity", "ragged_dot", "pallas")
_PATHS = flags.DEFINE_list("paths", list(PATHS), f"layer paths to time, from {PATHS} "
                           "(pallas only on TPU; floor: the routed FLOPs as one dense matmul "
                           "chain, the same one expert at a time, and the shared experts alone)")
_MODEL = flags.DEFINE_bool("model", False, "time training steps of tiny models instead")
_JSON = common_flags.json_out()


def layer_rows(t, d, e, f, k, s, reps, interpret, only=PATHS) -> list[Row]:
  ks = jax.random.split(jax.random.key(0), 8)
  x = jax.random.normal(ks[0], (t, d))
  w_router = 0.02 * jax.random.normal(ks[1], (d, e))
  routed = tuple(0.02 * jax.random.normal(kk, shape) for kk, shape in
                 zip(ks[2:5], [(e, d, f), (e, d, f), (e, f, d)]))
  shared = tuple(0.02 * jax.random.normal(kk, shape) for kk, shape in
                 zip(ks[5:8], [(d, s * f), (d, s * f), (s * f, d)]))
  cfg = ModelConfig(d_model=d, n_heads=1, router="topk", n_routed_experts=e, n_shared_experts=s,
                    n_activated_experts=k, expert_width=f)
  swiglu = layers.ffn_function(cfg.ffn_backend, jax.default_backend())

  def route(x, w_router):
    logits = routers.router_logits(x, w_router)
    return routers.route_topk(routers.RouteArgs(cfg, logits, None, None))

  def dropless(backend):
    def layer(x, w_router, routed, shared):
      y, _ = moe_layer.dropless_moe(x, route(x, w_router), routed, backend)
      return y + swiglu(x, *shared)
    return layer

  def capacity(x, w_router, routed, shared):
    y, _ = moe_layer.capacity_moe(x, route(x, w_router), routed, capacity_factor=1.0)
    return y + swiglu(x, *shared)

  width = (s + k) * f
  dense_w = tuple(0.02 * jax.random.normal(kk, shape) for kk, shape in
                  zip(ks[2:5], [(d, width), (d, width), (width, d)]))
  dense = lambda x, w: swiglu(x, *w)
  args = (x, w_router, routed, shared)
  default = registry.concrete_name("auto", t * k, routed[0])
  limit = Path(f"dense SwiGLU width {width} (limit)", dense, (x, dense_w))
  labels = {"fused": "dropless fused XLA loop (sort, gather, SwiGLU, scatter per chunk)",
            "cpu_ffi": "dropless C++ FFI kernel, whole experts per CPU thread",
            "tiled": "dropless sort + permute + tiled gmm loop + combine",
            "capacity": "capacity einsum cf=1.0 (drops tokens)",
            "ragged_dot": "dropless sort + permute + jax.lax.ragged_dot + combine",
            "pallas": "dropless Pallas kernels (Mosaic)"}
  paths = []
  for name in PATHS:  # ragged_dot late: on CPU its 12 GiB of buffers disturb what follows
    if name not in only or (name == "pallas" and jax.default_backend() != "tpu"):
      continue
    if name == "cpu_ffi" and (jax.default_backend() != "cpu" or not cpu_kernel.available()):
      continue
    if name == "floor":  # what free dispatch would cost: the same matmul shapes, unrouted
      per_expert = lambda rows, w: jax.lax.map(lambda a: swiglu(*a), (rows, *w))
      paths += [Path(f"floor: routed FLOPs as one SwiGLU on [T*K', d], width {f}", dense,
                     (jnp.tile(x, (k, 1)), tuple(w[0] for w in routed))),
                Path("floor: routed FLOPs one expert at a time (lax.map, equal contiguous groups)",
                     per_expert, (jnp.tile(x, (k, 1)).reshape(e, -1, d), routed)),
                Path(f"floor: shared experts alone (width {s * f})", dense, (x, shared))]
      continue
    layer = capacity if name == "capacity" else dropless(registry.get(name))
    paths.append(Path(labels[name], layer, args, name == default))
  rows = measure(limit, paths, reps)
  if interpret:
    small = (x[:interpret], *args[1:])
    rows += measure(Path("", dense, (small[0], dense_w)),
                    [Path(f"dropless Pallas interpret (reference; T={interpret})",
                          dropless(registry.get("pallas_interpret")), small)], 1)[1:]
  return rows


def model_rows(reps: int) -> list[Row]:
  """Train-step time of tiny DeepSeekMoE and of a dense model of equal activated width."""
  from moe.train.config import TrainConfig
  from moe.train.state import create_state
  from moe.train.steps import train_step

  moe_cfg = get_preset("tiny_deepseekmoe")
  dense_cfg = get_preset("tiny_dense").replace(
      dense_ffn_width=(moe_cfg.n_shared_experts + moe_cfg.n_activated_experts) * moe_cfg.expert_width)
  rows = []
  for name, cfg in (("tiny dense, equal activated width", dense_cfg), ("tiny_deepseekmoe", moe_cfg)):
    graphdef, state = create_state(cfg, TrainConfig())
    batch = random_batch(16, 128, cfg.vocab_size)
    box = [state]

    def step():
      box[0], metrics = train_step(graphdef, box[0], batch, jax.random.key(0))
      return metrics["loss"]

    ms = time_ms(lambda: step(), (), reps)
    rows.append(Row(name, float("nan"), ms, -1, default=cfg is moe_cfg))
  for row in rows:
    row.ratio_to_dense = row.fwd_bwd_ms / rows[0].fwd_bwd_ms
  return rows


def main(argv):
  del argv
  t, d, e, f, k, s, reps = common_flags.layer_shape()
  if _MODEL.value:
    rows = model_rows(reps)
    header = "training step, tiny models, batch 16 x 128 (fwd+bwd ms = one optimizer step)"
  else:
    unknown = set(_PATHS.value) - set(PATHS)
    if unknown:
      raise app.UsageError(f"--paths: unknown {sorted(unknown)}; choose from {PATHS}")
    rows = layer_rows(t, d, e, f, k, s, reps, _INTERPRET.value, tuple(_PATHS.value))
    header = f"MoE layer: T={t} d_model={d} {s} shared + {e} routed experts of width {f}, {k} active"
  print(f"{header}; backend {jax.default_backend()}, {jax.devices()[0].device_kind}")
  print(format_table(rows))
  if _JSON.value:
    write_json(rows, _JSON.value)


if __name__ == "__main__":
  errors.run(main)
