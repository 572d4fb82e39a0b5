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
import statistics
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from absl import app, flags

from data.input_pipeline import random_batch
from experiments import common_flags, errors
from experiments.timing import temp_bytes, time_ms
from moe.dispatch import cpu_kernel, registry
from moe.dispatch.experts import swiglu
from moe.model import moe_layer, routers
from moe.model.config import ModelConfig
from moe.model.presets import get_preset

_T = flags.DEFINE_integer("tokens", 4096, "tokens per batch (T)")
_D = flags.DEFINE_integer("d_model", 512, "model width")
_E = common_flags.n_routed_experts()  # default 64
_F = flags.DEFINE_integer("expert_width", 128, "expert FFN width")
_K = flags.DEFINE_integer("n_activated_experts", 6, "routed experts per token (top-k)")
_S = common_flags.n_shared_experts()  # default 2
_REPS = common_flags.reps()
_INTERPRET = flags.DEFINE_integer("interpret_tokens", 256,
                                   "tokens for the interpret-mode Pallas row, which is timed against "
                                   "its own dense limit at that size (0: skip; it is slow)")
PATHS = ("fused", "cpu_ffi", "tiled", "floor", "capacity", "ragged_dot", "pallas")
_PATHS = flags.DEFINE_list("paths", list(PATHS), f"layer paths to time, from {PATHS} "
                           "(pallas only on TPU; floor: the routed FLOPs as one dense matmul "
                           "chain, the same one expert at a time, and the shared experts alone)")
_MODEL = flags.DEFINE_bool("model", False, "time training steps of tiny models instead")
_ROUTERS = flags.DEFINE_bool("routers", False, "time each router (routing alone, and the whole "
                             "layer on the default backend) against DeepSeekMoE's topk instead")
_JSON = common_flags.json_out()


@dataclasses.dataclass
class Row:
  path: str
  fwd_ms: float
  fwd_bwd_ms: float
  peak_temp_bytes: int
  ratio_to_dense: float = float("nan")
  default: bool = False


class Path(NamedTuple):
  name: str
  layer: Callable  # (*args) -> [T, d]
  args: tuple
  default: bool = False


class Jitted(NamedTuple):
  fwd: Callable
  fwd_args: tuple
  grad: Callable
  grad_args: tuple


def _compiled(path: Path) -> Jitted:
  """Forward, and forward+backward w.r.t. every input. The output cotangent is an argument,
  as in training: a constant one would let XLA fold it into the backward pass."""
  cot = 1e-3 * jnp.ones(jax.eval_shape(path.layer, *path.args).shape, jnp.float32)
  grad = jax.jit(jax.grad(lambda cot, *a: jnp.sum(path.layer(*a) * cot),
                          argnums=tuple(range(1, len(path.args) + 1))))
  return Jitted(jax.jit(path.layer), path.args, grad, (cot, *path.args))


def _time_round_robin(compiled, reps: int) -> list[tuple[list[float], list[float]]]:
  """Forward and forward+backward times of each compiled path, the paths taking turns within
  every repetition, so a slow spell of the machine hits them alike."""
  for fwd, fwd_args, grad, grad_args in compiled:  # compile and warm up
    jax.block_until_ready((fwd(*fwd_args), grad(*grad_args)))
  times = [([], []) for _ in compiled]
  for _ in range(reps):
    for (fwd, fwd_args, grad, grad_args), (t_fwd, t_grad) in zip(compiled, times):
      t_fwd.append(time_ms(fwd, fwd_args, 1, warmup=False))
      t_grad.append(time_ms(grad, grad_args, 1, warmup=False))
  return times


def measure(limit: Path, paths: list[Path], reps: int) -> list[Row]:
  """Rows for the limit and each path; every path is timed in turns with the limit, and
  its ratio_to_dense is its median forward+backward time over the limit's in that window
  (so one path's huge buffers, e.g. ragged_dot's on CPU, do not slow the others' windows)."""
  limit_compiled = _compiled(limit)
  limit_times, rows = ([], []), []
  for path in paths:
    compiled = _compiled(path)
    (l_fwd, l_grad), (t_fwd, t_grad) = _time_round_robin([limit_compiled, compiled], reps)
    limit_times[0].extend(l_fwd)
    limit_times[1].extend(l_grad)
    rows.append(Row(path.name, statistics.median(t_fwd), statistics.median(t_grad),
                    temp_bytes(compiled.grad, compiled.grad_args),
                    statistics.median(t_grad) / statistics.median(l_grad), path.default))
  limit_row = Row(limit.name, statistics.median(limit_times[0]), statistics.median(limit_times[1]),
                  temp_bytes(limit_compiled.grad, limit_compiled.grad_args), 1.0)
  return [limit_row, *rows]


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


def router_variants(e: int) -> dict[str, dict]:
  """name -> ModelConfig fields; 8 groups with 3 kept, as DeepSeek-V2 (V3 keeps 4 of 8)."""
  return {
      "topk (DeepSeekMoE)": dict(router="topk"),
      "group_limited (V2), 8 groups, 3 kept": dict(router="group_limited", n_group=8, topk_group=3),
      "sigmoid_bias (V3), 8 groups, 3 kept": dict(router="sigmoid_bias", n_group=8, topk_group=3,
                                                  norm_topk_prob=True, routed_scaling_factor=2.5),
      f"topk + {e // 4} zero-compute experts": dict(router="topk", n_null_experts=e // 4),
  }


def router_rows(t, d, e, f, k, s, reps) -> list[Row]:
  """Each router against topk: its routing alone (router matmul, scores, choice) and the
  whole layer (routing + dropless dispatch on the default backend + shared experts)."""
  ks = jax.random.split(jax.random.key(0), 8)
  x = jax.random.normal(ks[0], (t, d))
  routed = tuple(0.02 * jax.random.normal(kk, shape) for kk, shape in
                 zip(ks[2:5], [(e, d, f), (e, d, f), (e, f, d)]))
  shared = tuple(0.02 * jax.random.normal(kk, shape) for kk, shape in
                 zip(ks[5:8], [(d, s * f), (d, s * f), (s * f, d)]))
  backend = registry.resolve("auto")
  routing_paths, layer_paths = [], []
  for name, fields in router_variants(e).items():
    cfg = ModelConfig(d_model=d, n_heads=1, n_routed_experts=e, n_shared_experts=s,
                      n_activated_experts=k, expert_width=f, **fields)
    w_router = 0.02 * jax.random.normal(ks[1], (d, cfg.n_route_targets))
    bias = jnp.zeros((cfg.n_route_targets,))

    def route(x, w_router, cfg=cfg, bias=bias):
      args = routers.RouteArgs(cfg, routers.router_logits(x, w_router), None, None, bias, cfg.n_group)
      return moe_layer.without_null_experts(cfg, routers.ROUTERS[cfg.router].fn(args))

    def layer(x, w_router, routed, shared, route=route):
      y, _ = moe_layer.dropless_moe(x, route(x, w_router), routed, backend)
      return y + swiglu(x, *shared)

    routing_paths.append(Path(f"routing only: {name}", lambda x, w, route=route: route(x, w).gates,
                              (x, w_router)))
    layer_paths.append(Path(f"layer: {name}", layer, (x, w_router, routed, shared)))
  return (measure(routing_paths[0], routing_paths[1:], reps)
          + measure(layer_paths[0], layer_paths[1:], reps))


def null_share_table(t, d, e, f, k, s, reps) -> str:
  """Zero-compute experts: as their number grows, the real experts per token, the rows the
  grouped matmuls multiply (routed FLOPs = rows x 6 d f forward), the layer's forward+backward
  time on the default backend, and, on a mesh of every local device as expert shards
  (several devices, e.g. XLA_FLAGS=--xla_force_host_platform_device_count=8 on CPU), the
  rows the exchange sends per (token, choice) pair."""
  from flax import nnx

  from moe.dispatch import sorting
  from moe.parallel.mesh import MeshConfig, make_mesh, use_mesh

  n_dev = jax.device_count()
  mesh = make_mesh(MeshConfig(f"expert:{n_dev}")) if n_dev > 1 and e % n_dev == 0 else None
  x = jax.random.normal(jax.random.key(0), (t, d))
  lines = ["| zero-compute experts | real experts / token | rows multiplied | routed GFLOP fwd | "
           f"fwd+bwd ms | rows sent / pair ({n_dev} shards) |", "|---:|---:|---:|---:|---:|---:|"]
  for z in (0, e // 4, e // 2, e):
    # init_std 0.1: scores far enough from uniform that the null share is the router's choice
    cfg = ModelConfig(d_model=d, n_heads=1, n_routed_experts=e, n_shared_experts=s,
                      n_activated_experts=k, expert_width=f, n_null_experts=z, init_std=0.1)
    graphdef, state = nnx.split(moe_layer.MoE(cfg, nnx.Rngs(0)))
    call = lambda state, x, graphdef=graphdef: nnx.merge(graphdef, state)(x, jnp.zeros((t,), jnp.int32))
    y, aux = jax.jit(call)(state, x)
    real = float(aux["real_experts_per_token"])
    route = routers.route_topk(routers.RouteArgs(cfg, routers.router_logits(
        x, nnx.merge(graphdef, state).router[...]), None, None))
    rows = int(sorting.n_routed(sorting.sort_by_expert(
        moe_layer.without_null_experts(cfg, route).expert_idx, e)))
    grad = jax.jit(jax.grad(lambda state, x: jnp.sum(call(state, x)[0])))
    ms = statistics.median(time_ms(grad, (state, x), 1) for _ in range(reps))
    sent = "-"
    if mesh is not None:
      def on_mesh(state, x, graphdef=graphdef):
        with use_mesh(mesh):
          return nnx.merge(graphdef, state)(x, jnp.zeros((t,), jnp.int32))[1]["ep_rows_per_pair"]
      sent = f"{float(jax.jit(on_mesh)(state, x)):.3f}"
    lines.append(f"| {z} | {real:.2f} | {rows:,} | {rows * 6 * d * f / 1e9:.2f} | {ms:.1f} | {sent} |")
  return "\n".join(lines)


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


def format_table(rows: list[Row]) -> str:
  lines = ["| path | fwd ms | fwd+bwd ms | peak temp MiB | ratio_to_dense | default |",
           "|---|---:|---:|---:|---:|---|"]
  for r in rows:
    temp = f"{r.peak_temp_bytes / 2**20:.1f}" if r.peak_temp_bytes >= 0 else "-"
    fwd = f"{r.fwd_ms:.1f}" if r.fwd_ms == r.fwd_ms else "-"
    lines.append(f"| {r.path} | {fwd} | {r.fwd_bwd_ms:.1f} | {temp} | {r.ratio_to_dense:.2f} | "
                 f"{'yes' if r.default else ''} |")
  return "\n".join(lines)


def write_json(rows: list[Row], path: str) -> None:
  """The rows as a JSON list of {path, fwd_ms, fwd_bwd_ms, peak_temp_bytes, ratio_to_dense,
  default}; times in milliseconds, ratio_to_dense of forward+backward."""
  with open(path, "w") as fh:
    json.dump([{"path": r.path, "fwd_ms": r.fwd_ms, "fwd_bwd_ms": r.fwd_bwd_ms,
                "peak_temp_bytes": r.peak_temp_bytes, "ratio_to_dense": r.ratio_to_dense,
                "default": r.default} for r in rows], fh, indent=2)


def main(argv):
  del argv
  e = 64 if _E.value is None else _E.value
  s = 2 if _S.value is None else _S.value
  if _MODEL.value:
    rows = model_rows(_REPS.value)
    header = "training step, tiny models, batch 16 x 128 (fwd+bwd ms = one optimizer step)"
  elif _ROUTERS.value:
    rows = router_rows(_T.value, _D.value, e, _F.value, _K.value, s, _REPS.value)
    header = (f"routers: T={_T.value} d_model={_D.value} {s} shared + {e} routed experts of width "
              f"{_F.value}, {_K.value} active; ratio_to_dense = over the first row of its half "
              f"(topk); default backend {registry.default_name()}")
  else:
    unknown = set(_PATHS.value) - set(PATHS)
    if unknown:
      raise app.UsageError(f"--paths: unknown {sorted(unknown)}; choose from {PATHS}")
    rows = layer_rows(_T.value, _D.value, e, _F.value, _K.value, s, _REPS.value,
                      _INTERPRET.value, tuple(_PATHS.value))
    header = (f"MoE layer: T={_T.value} d_model={_D.value} {s} shared + {e} routed "
              f"experts of width {_F.value}, {_K.value} active")
  print(f"{header}; backend {jax.default_backend()}, {jax.devices()[0].device_kind}")
  print(format_table(rows))
  if _ROUTERS.value:
    print(f"\nzero-compute experts beside the {e} routed ones (topk, {_K.value} choices per token):")
    print(null_share_table(_T.value, _D.value, e, _F.value, _K.value, s, _REPS.value))
  if _JSON.value:
    write_json(rows, _JSON.value)


if __name__ == "__main__":
  errors.run(main)
