"""Ahead-of-time planning: compile the sharded train step from abstract shapes (nothing is
allocated) and read off what each device would hold.

    p = plan(get_preset('deepseekmoe_16b'), TrainConfig(), mesh, batch=256, seq_len=4096)

Per-device bytes of parameters and optimizer state come from the shardings the rules give
(exact); temporaries from the compiled executable's memory analysis (XLA's CPU compiler
here: a TPU's scheduler and fusions differ, so treat it as an estimate); all_to_all bytes
from the expert-parallel buffer sizes (tests check the formulas against compiled HLO).
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from moe.model.config import ModelConfig
from moe.model.counts import count_params
from moe.model.moe_layer import shard_reach
from moe.parallel import compiled_cost, expert_parallel, rounds, rules, slices
from moe.parallel.mesh import BATCH_AXES, slice_of
from moe.train.config import TrainConfig
from moe.train.state import abstract_state
from moe.train.steps import make_steps


# The named scopes of the model and the train step (moe.model, moe.train.steps): where an
# estimated second is spent.
COMPONENTS = ("attention", "router", "dispatch", "routed_experts", "shared_experts", "dense_ffn",
              "lm_head_loss", "embedding", "optimizer")


class Speed(NamedTuple):
  """The TPU compiler's estimate of one train step, per chip (moe.parallel.compiled_cost)."""
  model_flops: float        # 6 x activated params x tokens + attention (moe.model.counts), per chip
  compiled_flops: float     # matmul and kernel FLOPs in the compiled step, per chip
  step_seconds: float       # estimated, exposed collectives included
  tokens_per_sec: float     # per chip
  mfu: float                # model_flops / (step_seconds x the chip's peak bf16 FLOP/s)
  seconds: dict             # component -> estimated seconds
  component_flops: dict     # component -> compiled matmul and kernel FLOPs
  all_to_all_bytes: float   # sent per chip per step, as compiled (one dropless round)
  collectives: dict         # "kind sync|async" -> count per step
  overlapped_seconds: float  # collective time hidden behind compute
  unestimated: dict         # what has no estimate -> count per step


def speed(compiled_text: str, generation: str, cfg: ModelConfig, mesh: Mesh, batch: int,
          seq_len: int) -> Speed:
  """The estimate for a step compiled for `generation` chips (dropless rounds: one each)."""
  cost = compiled_cost.estimate(compiled_text, generation,
                                compiled_cost.scope_component(COMPONENTS))
  tokens = batch * seq_len / mesh.size
  model_flops = count_params(cfg, seq_len).train_flops_per_token * tokens
  seconds = dict(cost.seconds)
  if any("kernel without estimate in attention" in k for k in cost.unestimated):
    # Splash attention's kernels carry no cost estimate: their score and value matmuls
    # (12 L d S per token, half of it under a causal mask; a forward again under remat) at
    # the chip's peak, a floor.
    flops = 6 * cfg.n_layers * cfg.d_model * seq_len * tokens * (4 / 3 if cfg.remat else 1)
    seconds["attention kernels (at peak)"] = flops / compiled_cost.PEAK_FLOPS[generation]
  step = sum(seconds.values())
  return Speed(
      model_flops=model_flops, compiled_flops=cost.flops, step_seconds=step,
      tokens_per_sec=tokens / step if step else float("nan"),
      mfu=model_flops / (step * compiled_cost.PEAK_FLOPS[generation]) if step else float("nan"),
      seconds=seconds, component_flops=dict(cost.component_flops), all_to_all_bytes=cost.collective_bytes.get("all-to-all", 0.0),
      collectives={f"{k} {mode}": n for (k, mode), n in sorted(cost.collectives.items())},
      overlapped_seconds=cost.overlapped_seconds, unestimated=dict(cost.unestimated))


class Plan(NamedTuple):
  n_devices: int
  param_bytes: int        # per device
  optimizer_bytes: int    # per device
  temp_bytes: int         # per device, compiled temporaries
  argument_bytes: int     # per device, the step's inputs (state + batch)
  peak_bytes: int         # per device: arguments + temporaries + outputs not aliased to inputs
  all_to_all_bytes: int   # per device per step, sent (dropless: every layer in one round)
  extra_round_bytes: int  # dropless: what one more round in every MoE layer adds per step
  compile_seconds: float
  tokens_per_device: int
  speed: Speed | None = None  # TPU compiles only
  cross_slice_bytes: int = 0  # per device per step sent to other slices (DCN), as compiled


def shard_bytes(a, sharding) -> int:
  """Bytes of one device's shard of array (or abstract array) `a` under `sharding`."""
  return math.prod(sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize


def per_device_bytes(abstract, shardings) -> int:
  """One device's bytes of a tree; `shardings` mirrors it (plain shardings, or nnx
  Variables holding them as the rules give a model's state)."""
  is_var = lambda x: isinstance(x, nnx.Variable)
  unwrap = lambda s: s.get_value() if is_var(s) else s
  return int(sum(shard_bytes(a, unwrap(s))
                 for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings, is_leaf=is_var))))


def step_all_to_all_bytes(cfg: ModelConfig, mesh: Mesh, tokens_per_device: int,
                          n_rounds: int = 1) -> int:
  """Bytes one device sends by all_to_all in a train step: every MoE layer forward and its
  backward. Dropless: `n_rounds` rounds per layer (1 = balanced routing; moe.parallel.rounds);
  remat adds nothing, as the rounds' custom VJP recomputes each round itself and the
  rematerialised forward's output is unused (the compiled step sends the same bytes with
  and without remat: tests/test_rounds.py). Capacity exchange: one, whatever the routing,
  run again by remat."""
  if not cfg.is_moe_model:
    return 0
  n_shards = mesh.shape["expert"]
  itemsize = jnp.dtype(cfg.dtype).itemsize
  k = cfg.n_activated_experts
  capacity = expert_parallel.layer_capacity_factor(cfg.expert_capacity_factor, mesh)
  if capacity <= 0:
    blocks = rounds.block_sizes(tokens_per_device, k, cfg.n_routed_experts, n_shards,
                                cfg.expert_block_factor, shard_reach(cfg, mesh))
    fwd = rounds.round_bytes(blocks, n_shards, cfg.d_model, itemsize)
    bwd = rounds.round_backward_bytes(blocks, n_shards, cfg.d_model, itemsize)
    return cfg.n_moe_layers * n_rounds * (fwd + bwd)
  fwd = expert_parallel.all_to_all_bytes(tokens_per_device, k, cfg.d_model, n_shards, capacity,
                                         itemsize)
  rows = expert_parallel.block_rows(tokens_per_device, k, n_shards, capacity)
  bwd = 2 * (n_shards - 1) * rows * cfg.d_model * itemsize
  return cfg.n_moe_layers * (fwd * (2 if cfg.remat else 1) + bwd)


def compile_step(cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh, batch: int,
                 seq_len: int, compiler_options: dict | None = None):
  """(compiled train step for [batch, seq_len] global batches on `mesh`, abstract state,
  its shardings, compile seconds): lowered from abstract shapes, nothing allocated."""
  rules.check_batch(mesh, batch, "batch")
  graphdef, abstract = abstract_state(cfg, train_cfg)
  steps = make_steps(graphdef, abstract, mesh)
  state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, steps.state_shardings)
  batch_sh = rules.batch_sharding(mesh)
  batch_in = {name: jax.ShapeDtypeStruct((batch, seq_len), dtype, sharding=batch_sh)
              for name, dtype in [("inputs", jnp.int32), ("targets", jnp.int32),
                                  ("weights", jnp.float32), ("segment_ids", jnp.int32),
                                  ("positions", jnp.int32)]}
  key = jax.eval_shape(lambda: jax.random.key(0))
  key_in = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rules.replicated(mesh))
  start = time.perf_counter()
  compiled = steps.train.lower(state_in, batch_in, key_in).compile(compiler_options)
  return compiled, abstract, steps.state_shardings, time.perf_counter() - start


def plan(cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh, batch: int, seq_len: int,
         generation: str | None = None, compiler_options: dict | None = None) -> Plan:
  """Lower and compile the train step for [batch, seq_len] global batches on `mesh`; with
  `generation` (the TPU compiler's devices of that chip), its speed estimate too."""
  compiled, abstract, state_shardings, seconds = compile_step(cfg, train_cfg, mesh, batch, seq_len,
                                                              compiler_options)
  mem = compiled.memory_analysis()
  multi_slice = len({slice_of(d) for d in mesh.devices.flat}) > 1
  text = compiled.as_text() if generation or multi_slice else ""  # MBs at 145B: only if read
  model_state, opt_state = abstract[0], abstract[1]  # nnx.State keyed 0 (model), 1 (optimizer)
  model_sh, opt_sh = state_shardings[0], state_shardings[1]
  tokens = batch * seq_len // math.prod(mesh.shape[a] for a in BATCH_AXES)
  args, temp = int(mem.argument_size_in_bytes), int(mem.temp_size_in_bytes)
  out_new = int(mem.output_size_in_bytes) - int(mem.alias_size_in_bytes)
  return Plan(
      n_devices=mesh.size,
      param_bytes=per_device_bytes(model_state, model_sh),
      optimizer_bytes=per_device_bytes(opt_state, opt_sh),
      temp_bytes=temp, argument_bytes=args, peak_bytes=args + temp + max(out_new, 0),
      all_to_all_bytes=step_all_to_all_bytes(cfg, mesh, tokens),
      extra_round_bytes=(step_all_to_all_bytes(cfg, mesh, tokens, 2) - step_all_to_all_bytes(cfg, mesh, tokens)
                         if cfg.expert_capacity_factor <= 0 else 0),
      compile_seconds=seconds, tokens_per_device=tokens,
      speed=speed(text, generation, cfg, mesh, batch, seq_len) if generation else None,
      cross_slice_bytes=slices.cross_slice(text).sent_bytes if multi_slice else 0)
