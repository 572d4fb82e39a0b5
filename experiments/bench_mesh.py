"""What expert parallelism costs: train-step time of a tiny DeepSeekMoE on one device and
on meshes of simulated CPU devices; prints a table.

  python -m experiments.bench_mesh                          # 8 simulated devices
  python -m experiments.bench_mesh --mesh=expert:8 --mesh=data:8

Simulated devices share this machine's cores and their collectives are memory copies, so
the ratios say what the sharded program adds in work, not how a TPU slice would scale.
"""

from __future__ import annotations

import math

import jax

from data.input_pipeline import random_batch
from experiments import common_flags, errors
from experiments.timing import time_ms
from moe.cpu_threads import reserve_collective_threads
from moe.model.presets import get_preset
from moe.parallel.mesh import MeshConfig, make_mesh
from moe.train.config import TrainConfig
from moe.train.state import init_state
from moe.train.steps import make_steps, put_batch

LAYOUTS = ("data:8", "data:2,expert:4", "fsdp:2,expert:2,tensor:2", "expert:8")
_MESHES = common_flags.mesh(multiple=True)  # every size given; default LAYOUTS
_REPS = common_flags.reps()
_BATCH = common_flags.batch_size()  # default 16
_SEQ = common_flags.seq_len()  # default 128


def step_ms(cfg, mesh, batch, reps: int) -> float:
  graphdef, state = init_state(cfg, TrainConfig(), mesh)
  steps = make_steps(graphdef, state, mesh)
  box = [state]
  data = put_batch(batch, mesh)

  def step():
    box[0], metrics = steps.train(box[0], data, jax.random.key(0))
    return metrics["loss"]

  return time_ms(step, (), reps)


def _size(shape: str) -> int:
  return math.prod(int(part.split(":")[1]) for part in shape.split(","))


def main(argv):
  del argv
  layouts = _MESHES.value or LAYOUTS
  n = max(_size(shape) for shape in layouts)
  reserve_collective_threads(n)  # before the backend starts (moe/cpu_threads.py)
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", n)  # before the backend starts
  cfg = get_preset("tiny_deepseekmoe").replace(n_routed_experts=16)  # 16 splits 2/4/8 ways
  b, s = _BATCH.value or 16, _SEQ.value or 128
  batch = random_batch(b, s, cfg.vocab_size)
  single = step_ms(cfg, None, batch, _REPS.value)
  print(f"train step, {cfg.name} with 16 routed experts, batch {b} x {s}; "
        f"{len(jax.devices())} simulated CPU devices on {jax.local_devices()[0].device_kind}")
  print("| layout | expert exchange | step ms | ratio to one device |")
  print("|---|---|---:|---:|")
  print(f"| one device | - | {single:.1f} | 1.00 |")
  for shape in layouts:
    mesh = make_mesh(MeshConfig(shape), jax.devices()[:_size(shape)])
    shards = mesh.shape["expert"]
    # The default dropless rounds; beside them, one exchange of blocks that hold every pair
    # (capacity factor = shards: nothing dropped, worst-case buffers).
    exchanges = [("rounds (default)", cfg)]
    if shards > 1:
      exchanges.append((f"one, every-pair blocks (capacity {shards})",
                        cfg.replace(expert_capacity_factor=float(shards))))
    for name, c in exchanges:
      ms = step_ms(c, mesh, batch, _REPS.value)
      print(f"| {shape} | {name if shards > 1 else '-'} | {ms:.1f} | {ms / single:.2f} |")


if __name__ == "__main__":
  errors.run(main)
