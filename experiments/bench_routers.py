"""The DeepSeekMoE family's routers against DeepSeekMoE's top-k, and zero-compute experts;
prints two tables. The layer shape and repetitions are bench_moe's flags.

  python -m experiments.bench_routers
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.bench_routers
      # the zero-compute table's "rows sent" column: the 8 devices as expert shards

Routers: each one's routing alone (router matmul, scores, choice) and its whole layer
(routing + dropless dispatch on the default backend + shared experts), each timed in turns
with topk's (experiments.timing.measure), median of --reps.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from experiments import common_flags, errors
from experiments.timing import Path, Row, format_table, measure, time_ms
from moe.dispatch import registry
from moe.dispatch.experts import swiglu
from moe.model import moe_layer, routers
from moe.model.config import ModelConfig

common_flags.layer_shape_flags()


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
    ms = time_ms(grad, (state, x), reps)  # one warm-up, then the median of reps
    sent = "-"
    if mesh is not None:
      def on_mesh(state, x, graphdef=graphdef):
        with use_mesh(mesh):
          return nnx.merge(graphdef, state)(x, jnp.zeros((t,), jnp.int32))[1]["ep_rows_per_pair"]
      sent = f"{float(jax.jit(on_mesh)(state, x)):.3f}"
    lines.append(f"| {z} | {real:.2f} | {rows:,} | {rows * 6 * d * f / 1e9:.2f} | {ms:.1f} | {sent} |")
  return "\n".join(lines)


def main(argv):
  del argv
  t, d, e, f, k, s, reps = common_flags.layer_shape()
  print(f"routers: T={t} d_model={d} {s} shared + {e} routed experts of width {f}, {k} active; "
        f"ratio_to_dense = over the first row of its half (topk); default backend "
        f"{registry.default_name()}; backend {jax.default_backend()}")
  print(format_table(router_rows(t, d, e, f, k, s, reps)))
  print(f"\nzero-compute experts beside the {e} routed ones (topk, {k} choices per token):")
  print(null_share_table(t, d, e, f, k, s, reps))


if __name__ == "__main__":
  errors.run(main)
