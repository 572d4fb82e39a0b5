"""Training-step throughput of this codebase against transformers' implementation of the
same model (moe.hub.torch_peer), on the same batch from the same initial weights.

  python -m experiments.bench_train                                # cpu_dense, cpu_deepseekmoe, tiny_deepseekmoe
  python -m experiments.bench_train --presets=tiny_deepseekmoe --steps=1 --runs=1 --warmup=1
  python -m experiments.bench_train --json_out=bench_train.json

Ours is the jitted step training runs (moe.train.state.create_state, moe.train.steps.
make_steps), blocked on each step's state; the peer's is forward, loss, backward and
AdamW with the same hyperparameters (moe.train.peer_step, which says what it leaves out).
Before timing, the first step's LM losses must agree (1e-4 relative): both compute the same
function. Then `--warmup` steps each, then `--runs` runs of `--steps` timed steps, ours
and the peer's taking turns. Reported: median tokens/s, ours/peer, the achieved GFLOP/s
(moe.model.counts' training FLOPs per token x tokens/s) and this machine's f32 matmul rate
in each framework, so the achieved rate reads as a fraction of what the machine does.
Batch 32 x 128 unless --batch_size / --seq_len say otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from data.input_pipeline import random_batch
from experiments import common_flags, errors
from experiments.timing import median_of, time_ms
from moe.hub.torch_peer import build_peer, hf_text_config, peer_batch
from moe.model.config import ModelConfig
from moe.model.counts import count_params
from moe.model.presets import get_preset
from moe.train.config import TrainConfig
from moe.train.peer_step import peer_train_step
from moe.train.state import create_state
from moe.train.steps import make_steps

DEFAULT_PRESETS = ("cpu_dense", "cpu_deepseekmoe", "tiny_deepseekmoe")
_PRESETS = flags.DEFINE_list("presets", list(DEFAULT_PRESETS), "presets to time (router 'topk' "
                             "or dense: what transformers' DeepSeekMoE v1 model computes)")
_BATCH = common_flags.batch_size()  # default 32
_SEQ_LEN = common_flags.seq_len()  # default 128
_STEPS = common_flags.steps()  # default 12
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps of each model before the runs (the "
                               "first compiles ours and checks the losses agree)", lower_bound=1)
_RUNS = flags.DEFINE_integer("runs", 3, "timed runs of --steps steps, ours and the peer's in "
                             "turns; the median run is reported", lower_bound=1)
_THREADS = flags.DEFINE_integer("threads", 2, "torch's intra-op threads (torch.set_num_threads); "
                                "XLA:CPU runs on a pool over the process's cores", lower_bound=1)
_PEER_ATTENTION = flags.DEFINE_string("peer_attention", None, "the peer's attn_implementation "
                                      "(default: transformers', sdpa)")
_PEER_EXPERTS = flags.DEFINE_string("peer_experts", None, "the peer's experts_implementation "
                                    "(default: transformers', grouped_mm where torch has it)")
_JSON = common_flags.json_out()

LOSS_RTOL = 1e-4


class PeerMismatchError(ValueError):
  """The peer does not compute what this codebase computes: its timing would mean nothing."""


@dataclasses.dataclass
class Row:
  preset: str
  total_params: int
  activated_params: int
  train_flops_per_token: float
  ours_tokens_per_s: float  # medians over runs
  peer_tokens_per_s: float
  ours_gflops: float
  peer_gflops: float
  first_lm_loss: float  # ours; the peer's agreed within LOSS_RTOL
  peer_first_loss: float
  peer_experts: str  # transformers' experts implementation, as resolved
  ours_runs: list[float] = dataclasses.field(default_factory=list)  # tokens/s of each run
  peer_runs: list[float] = dataclasses.field(default_factory=list)

  @property
  def ratio(self) -> float:
    return self.ours_tokens_per_s / self.peer_tokens_per_s


@dataclasses.dataclass(frozen=True)
class Machine:
  jax_matmul_gflops: float   # a jitted f32 jnp.dot of two [n, n] matrices
  torch_matmul_gflops: float  # torch.mm of the same
  matmul_n: int
  torch_threads: int
  cores: int


def matmul_rates(n: int = 1024, reps: int = 10) -> tuple[float, float]:
  """(jnp.dot, torch.mm) GFLOP/s of an f32 [n, n] x [n, n] product, median of reps."""
  import torch

  flops = 2 * n ** 3
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  jax_ms = time_ms(jax.jit(jnp.dot), (a, a), reps)
  t = torch.randn(n, n)
  torch.mm(t, t)  # warm-up
  torch_s, _ = median_of(reps, lambda: torch.mm(t, t))
  return flops / jax_ms / 1e6, flops / torch_s / 1e9


def check_same_function(ours: float, peer: float, rtol: float = LOSS_RTOL) -> None:
  """Raise PeerMismatchError unless the first step's LM losses agree within rtol."""
  if not abs(ours - peer) <= rtol * abs(ours):
    raise PeerMismatchError(f"first-step LM loss: ours {ours!r}, peer {peer!r} (relative "
                            f"difference {abs(ours - peer) / abs(ours):.2e} > {rtol:g}): the "
                            f"two models do not compute the same function")


def _timed(fn: Callable[[], None], steps: int) -> float:
  t = time.perf_counter()
  for _ in range(steps):
    fn()
  return time.perf_counter() - t


def measure(cfg: ModelConfig, batch_size: int, seq_len: int, warmup: int, steps: int, runs: int,
            train_cfg: TrainConfig | None = None, peer_attention: str | None = None,
            peer_experts: str | None = None) -> Row:
  """One row: both models from the same initial weights on one fixed batch; a timed step
  ends when its result is ready (ours blocks on the new state, torch is synchronous)."""
  train_cfg = train_cfg or TrainConfig()
  graphdef, state = create_state(cfg, train_cfg)
  model, _ = nnx.merge(graphdef, state)
  # Before the first (donating) step: the peer copies the initial weights.
  peer = build_peer(cfg, nnx.state(model, nnx.Param), peer_attention, peer_experts)
  del model
  train = make_steps(graphdef, state).train
  peer_step = peer_train_step(peer, cfg, train_cfg)
  host = random_batch(batch_size, seq_len, cfg.vocab_size)
  batch = jax.device_put(host)  # once: the peer's tensors are made once too
  input_ids, labels = peer_batch(host)
  key = jax.random.key(train_cfg.seed)  # routing is deterministic for 'topk'
  box = {"state": state}

  def ours_step() -> dict:
    box["state"], metrics = train(box["state"], batch, key)
    jax.block_until_ready((box["state"], metrics["loss"]))
    return metrics

  def their_step() -> float:
    return float(peer_step(input_ids, labels))

  first_lm, first_peer = float(ours_step()["lm_loss"]), their_step()  # also ours' compile
  check_same_function(first_lm, first_peer)
  for _ in range(warmup - 1):
    ours_step()
    their_step()
  tokens = steps * batch_size * seq_len
  ours_runs, peer_runs = [], []
  for _ in range(runs):  # in turns: a slow spell of the machine hits both
    ours_runs.append(tokens / _timed(ours_step, steps))
    peer_runs.append(tokens / _timed(their_step, steps))
  counts = count_params(cfg, seq_len)
  flops = counts.train_flops_per_token
  ours_tps, peer_tps = statistics.median(ours_runs), statistics.median(peer_runs)
  return Row(cfg.name, counts.total, counts.activated, flops, ours_tps, peer_tps,
             ours_tps * flops / 1e9, peer_tps * flops / 1e9, first_lm, first_peer,
             peer.model.config._experts_implementation, ours_runs, peer_runs)


def machine(threads: int, matmul_n: int = 1024) -> Machine:
  import torch

  torch.set_num_threads(threads)
  jax_rate, torch_rate = matmul_rates(matmul_n)
  return Machine(jax_rate, torch_rate, matmul_n, torch.get_num_threads(), len(os.sched_getaffinity(0)))


def format_table(rows: list[Row], m: Machine) -> str:
  lines = [f"f32 [{m.matmul_n}]^2 matmul: jnp.dot {m.jax_matmul_gflops:.1f} GFLOP/s, torch.mm "
           f"{m.torch_matmul_gflops:.1f} GFLOP/s (torch {m.torch_threads} threads; XLA:CPU its "
           f"pool over the process's {m.cores} cores)", "",
           "| preset | params (M) total / activated | train GFLOP/token | ours tokens/s | "
           "peer tokens/s | ours/peer | ours GFLOP/s (of jnp.dot) | peer GFLOP/s (of torch.mm) | "
           "first LM loss ours / peer | peer experts |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
  for r in rows:
    lines.append(
        f"| {r.preset} | {r.total_params / 1e6:.2f} / {r.activated_params / 1e6:.2f} | "
        f"{r.train_flops_per_token / 1e9:.4f} | {r.ours_tokens_per_s:,.0f} | "
        f"{r.peer_tokens_per_s:,.0f} | {r.ratio:.2f} | "
        f"{r.ours_gflops:.1f} ({r.ours_gflops / m.jax_matmul_gflops:.0%}) | "
        f"{r.peer_gflops:.1f} ({r.peer_gflops / m.torch_matmul_gflops:.0%}) | "
        f"{r.first_lm_loss:.5f} / {r.peer_first_loss:.5f} | {r.peer_experts} |")
  return "\n".join(lines)


def table(configs: list[ModelConfig | str], batch_size: int = 32, seq_len: int = 128,
          warmup: int = 2, steps: int = 12, runs: int = 3, threads: int = 2, matmul_n: int = 1024,
          **peer_options) -> tuple[str, list[Row], Machine]:
  """(markdown table, rows, machine) for configs or preset names; peer_options:
  measure's peer_attention, peer_experts."""
  configs = [get_preset(c) if isinstance(c, str) else c for c in configs]
  for cfg in configs:  # refuse a model the peer cannot be before timing any
    hf_text_config(cfg)
  m = machine(threads, matmul_n)  # sets torch's threads first
  rows = [measure(cfg, batch_size, seq_len, warmup, steps, runs, **peer_options) for cfg in configs]
  return format_table(rows, m), rows, m


def write_json(rows: list[Row], m: Machine, path: str) -> None:
  """{"machine": Machine's fields, "rows": [Row's fields + ratio]}; rates per second."""
  with open(path, "w") as fh:
    json.dump({"machine": dataclasses.asdict(m),
               "rows": [dict(dataclasses.asdict(r), ratio=r.ratio) for r in rows]}, fh, indent=2)


def main(argv):
  del argv
  b, s = _BATCH.value or 32, _SEQ_LEN.value or 128
  text, rows, m = table(_PRESETS.value, b, s, _WARMUP.value, _STEPS.value or 12, _RUNS.value,
                        _THREADS.value, peer_attention=_PEER_ATTENTION.value,
                        peer_experts=_PEER_EXPERTS.value)
  print(f"training step, batch {b} x {s}, f32, ours (JAX {jax.__version__}, backend "
        f"{jax.default_backend()}) vs transformers' DeepseekOcr2TextModel + AdamW; "
        f"{_STEPS.value or 12} steps x {_RUNS.value} runs after {_WARMUP.value} warm-up")
  print(text)
  if _JSON.value:
    write_json(rows, m, _JSON.value)


if __name__ == "__main__":
  errors.run(main)
