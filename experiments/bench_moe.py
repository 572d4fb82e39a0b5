"""Benchmark MoE dispatch paths against the dense limit; prints a table.

  python -m experiments.bench_moe                     # layer: one row per dispatch path
  python -m experiments.bench_moe --model             # train step: tiny DeepSeekMoE vs dense
  python -m experiments.bench_moe --json_out=bench.json

The dense limit is a dense SwiGLU whose width is the layer's activated width (shared +
K' routed experts): a MoE layer cannot do its activated FLOPs faster than one dense
matmul does. ratio_to_dense is forward+backward time over the dense limit's.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

import jax
import jax.numpy as jnp
from absl import app, flags

from data.input_pipeline import random_batch
from experiments.timing import time_ms
from moe import backends, experts, moe_layer, routing
from moe.config import ModelConfig, get_preset

_T = flags.DEFINE_integer("tokens", 4096, "tokens per batch (T)")
_D = flags.DEFINE_integer("d_model", 512, "model width")
_E = flags.DEFINE_integer("experts", 64, "routed experts")
_F = flags.DEFINE_integer("expert_width", 128, "expert FFN width")
_K = flags.DEFINE_integer("top_k", 6, "routed experts per token")
_S = flags.DEFINE_integer("shared", 2, "shared experts")
_REPS = flags.DEFINE_integer("reps", 5, "timed repetitions (median reported)")
_INTERPRET = flags.DEFINE_integer("interpret_tokens", 256,
                                   "tokens for the interpret-mode Pallas row, which is timed against "
                                   "its own dense limit at that size (0: skip; it is slow)")
_MODEL = flags.DEFINE_bool("model", False, "time training steps of tiny models instead")
_JSON = flags.DEFINE_string("json_out", None, "also write the rows as JSON here")


@dataclasses.dataclass
class Row:
  path: str
  fwd_ms: float
  fwd_bwd_ms: float
  peak_temp_bytes: int
  ratio_to_dense: float = float("nan")
  default: bool = False


def _temp_bytes(fn, args) -> int:
  analysis = fn.lower(*args).compile().memory_analysis()
  return int(getattr(analysis, "temp_size_in_bytes", -1)) if analysis is not None else -1


def measure(path: str, layer: Callable, args, reps: int) -> Row:
  """Forward and forward+backward (all inputs differentiated) of layer(*args) -> [T, d]."""
  fwd = jax.jit(layer)
  cot = jnp.ones_like(jax.eval_shape(layer, *args), dtype=jnp.float32) * 1e-3
  fwd_bwd = jax.jit(jax.grad(lambda *a: jnp.sum(layer(*a) * cot), argnums=tuple(range(len(args)))))
  return Row(path, time_ms(fwd, args, reps), time_ms(fwd_bwd, args, reps), _temp_bytes(fwd_bwd, args))


def layer_rows(t, d, e, f, k, s, reps, interpret) -> list[Row]:
  ks = jax.random.split(jax.random.key(0), 8)
  x = jax.random.normal(ks[0], (t, d))
  w_router = 0.02 * jax.random.normal(ks[1], (d, e))
  routed = tuple(0.02 * jax.random.normal(kk, shape) for kk, shape in
                 zip(ks[2:5], [(e, d, f), (e, d, f), (e, f, d)]))
  shared = tuple(0.02 * jax.random.normal(kk, shape) for kk, shape in
                 zip(ks[5:8], [(d, s * f), (d, s * f), (s * f, d)]))
  cfg = ModelConfig(d_model=d, n_heads=1, router="topk", n_routed_experts=e, n_shared_experts=s,
                    n_activated_experts=k, expert_width=f)

  def route(x, w_router):
    logits = routing.router_logits(x, w_router)
    return moe_layer.route_topk(moe_layer.RouteArgs(cfg, logits, None, None))

  def dropless(backend):
    def layer(x, w_router, routed, shared):
      y, _ = moe_layer.dropless_moe(x, route(x, w_router), routed, backend)
      return y + experts.swiglu(x, *shared)
    return layer

  def capacity(x, w_router, routed, shared):
    y, _ = moe_layer.capacity_moe(x, route(x, w_router), routed, capacity_factor=1.0)
    return y + experts.swiglu(x, *shared)

  width = (s + k) * f
  dense_w = tuple(0.02 * jax.random.normal(kk, shape) for kk, shape in
                  zip(ks[2:5], [(d, width), (d, width), (width, d)]))
  dense = measure(f"dense SwiGLU width {width} (limit)", lambda x, w: experts.swiglu(x, *w), (x, dense_w), reps)
  default_name = backends.AUTO.get(jax.default_backend(), "tiled")
  rows = [dense]
  args = (x, w_router, routed, shared)
  for name in ("tiled", "ragged_dot"):
    row = measure(f"dropless sort + {name}", dropless(backends.BACKENDS[name]), args, reps)
    row.default = name == default_name
    rows.append(row)
  rows.append(measure("capacity einsum cf=1.0 (drops tokens)", capacity, args, reps))
  if jax.default_backend() == "tpu":
    row = measure("dropless Pallas (Mosaic)", dropless(backends.BACKENDS["pallas"]), args, reps)
    row.default = True
    rows.append(row)
  for row in rows:
    row.ratio_to_dense = row.fwd_bwd_ms / dense.fwd_bwd_ms
  if interpret:
    small = [a[:interpret] if a is x else a for a in args]
    dense_small = measure("", lambda x, w: experts.swiglu(x, *w), (small[0], dense_w), 1)
    row = measure(f"dropless Pallas interpret (reference; T={interpret})",
                  dropless(backends.BACKENDS["pallas_interpret"]), small, 1)
    row.ratio_to_dense = row.fwd_bwd_ms / dense_small.fwd_bwd_ms
    rows.append(row)
  return rows


def model_rows(reps: int) -> list[Row]:
  """Train-step time of tiny DeepSeekMoE and of a dense model of equal activated width."""
  from moe.trainer import TrainConfig, create_state, train_step

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


def format_table(rows: list[Row]) -> str:
  lines = ["| path | fwd ms | fwd+bwd ms | peak temp MiB | ratio_to_dense | default |",
           "|---|---:|---:|---:|---:|---|"]
  for r in rows:
    temp = f"{r.peak_temp_bytes / 2**20:.1f}" if r.peak_temp_bytes >= 0 else "-"
    fwd = f"{r.fwd_ms:.1f}" if r.fwd_ms == r.fwd_ms else "-"
    lines.append(f"| {r.path} | {fwd} | {r.fwd_bwd_ms:.1f} | {temp} | {r.ratio_to_dense:.2f} | "
                 f"{'yes' if r.default else ''} |")
  return "\n".join(lines)


def main(argv):
  del argv
  if _MODEL.value:
    rows = model_rows(_REPS.value)
    header = "training step, tiny models, batch 16 x 128 (fwd+bwd ms = one optimizer step)"
  else:
    rows = layer_rows(_T.value, _D.value, _E.value, _F.value, _K.value, _S.value, _REPS.value,
                      _INTERPRET.value)
    header = (f"MoE layer: T={_T.value} d_model={_D.value} {_S.value} shared + {_E.value} routed "
              f"experts of width {_F.value}, {_K.value} active")
  print(f"{header}; backend {jax.default_backend()}, {jax.devices()[0].device_kind}")
  print(format_table(rows))
  if _JSON.value:
    with open(_JSON.value, "w") as fh:
      json.dump([{"path": r.path, "fwd_ms": r.fwd_ms, "fwd_bwd_ms": r.fwd_bwd_ms,
                  "peak_temp_bytes": r.peak_temp_bytes, "ratio_to_dense": r.ratio_to_dense,
                  "default": r.default} for r in rows], fh, indent=2)


if __name__ == "__main__":
  app.run(main)
