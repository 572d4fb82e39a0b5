"""Which mesh trains a model fastest on a TPU slice: every fsdp x expert x tensor layout of
the slice's chips (and dropless block factors), ranked by the TPU compiler's estimated step
time (moe.train.plan.speed) among the layouts whose peak memory fits the chip.

A full-depth compile of 16B takes minutes here, so each candidate compiles the same model
at two reduced depths (the dense first layers and 2, then 4, MoE layers: same layer shapes)
and scales the per-layer difference to full depth; `check_scaling` compares that with a
full compile.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

from moe.model.config import ModelConfig
from moe.model.counts import count_params
from moe.parallel import compiled_cost, topology
from moe.parallel.mesh import MeshConfig, make_mesh
from moe.train.config import TrainConfig
from moe.train.plan import plan

# MoE layers of the two reduced compiles (1 may compile without a loop). 145B's peak grew
# 0.357, 0.318 and 0.328 GiB per layer from 2 to 3, 3 to 4 and 4 to 6 MoE layers: a slope
# over two layers averages that noise (2, 3 overestimated the full peak by 5.6%).
DEPTHS = (2, 4)


class Estimate(NamedTuple):
  """One layout's estimate at full depth, per chip."""
  mesh: str
  block_factor: float
  step_seconds: float
  tokens_per_sec: float
  mfu: float
  peak_bytes: float
  fits: bool
  exchange_seconds: float  # exposed all_to_all time


def layouts(cfg: ModelConfig, n_chips: int, tensor_sizes=(1, 2, 4)) -> Iterator[str]:
  """fsdp x expert x tensor = n_chips, each size dividing what it shards."""
  widths = [cfg.n_heads, cfg.dense_ffn_width] + ([cfg.expert_width] if cfg.is_moe_model else [])
  for tensor in tensor_sizes:
    if n_chips % tensor or any(w % tensor for w in widths):
      continue
    for expert in range(1, n_chips // tensor + 1):
      if (n_chips // tensor) % expert or (expert > 1 and not cfg.is_moe_model):
        continue
      if cfg.is_moe_model and cfg.n_routed_experts % expert:
        continue
      yield f"fsdp:{n_chips // tensor // expert},expert:{expert},tensor:{tensor}"


def at_depth(cfg: ModelConfig, n_moe_layers: int) -> ModelConfig:
  return cfg.replace(n_layers=cfg.first_k_dense_replace + n_moe_layers)


def scaled(cfg: ModelConfig, mesh_spec: str, slice_name: str, batch: int, seq_len: int,
           train_cfg: TrainConfig | None = None) -> Estimate:
  """The full-depth estimate from two reduced-depth compiles, extrapolated linearly in the
  number of MoE layers (every per-layer cost, memory included, grows by one layer's)."""
  generation, chips = topology.parse(slice_name)
  mesh = make_mesh(MeshConfig(mesh_spec), topology.tpu_devices(slice_name))
  lo, hi = (plan(at_depth(cfg, n), train_cfg or TrainConfig(), mesh, batch, seq_len, generation)
            for n in DEPTHS)
  extra = (cfg.n_layers - cfg.first_k_dense_replace - DEPTHS[0]) / (DEPTHS[1] - DEPTHS[0])
  grow = lambda a, b: a + extra * (b - a)
  step = grow(lo.speed.step_seconds, hi.speed.step_seconds)
  peak = grow(lo.peak_bytes, hi.peak_bytes)
  tokens = batch * seq_len / chips
  model_flops = count_params(cfg, seq_len).train_flops_per_token * tokens
  return Estimate(mesh_spec, cfg.expert_block_factor, step, tokens / step,
                  model_flops / (step * compiled_cost.PEAK_FLOPS[generation]), peak,
                  peak <= topology.HBM_GIB[generation] * 2**30,
                  grow(lo.speed.seconds.get("exchange", 0.0), hi.speed.seconds.get("exchange", 0.0)))


def search(cfg: ModelConfig, slice_name: str, batch: int, seq_len: int,
           block_factors=(1.25,), tensor_sizes=(1, 2, 4)) -> list[Estimate]:
  """Every layout (and block factor) of the slice, fastest first; those that do not fit
  the chip's memory last."""
  _, chips = topology.parse(slice_name)
  out = []
  for spec in layouts(cfg, chips, tensor_sizes):
    for factor in (block_factors if cfg.is_moe_model else (cfg.expert_block_factor,)):
      try:
        out.append(scaled(cfg.replace(expert_block_factor=factor), spec, slice_name, batch, seq_len))
      except ValueError:  # the batch or a dimension does not split over this layout
        continue
  return sorted(out, key=lambda e: (not e.fits, e.step_seconds))
