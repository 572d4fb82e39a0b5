"""Training and evaluation loops, importable from scripts and notebooks alike.

    result = train_and_evaluate(workdir)   # configs from gin (or passed in)

Resumes from the latest checkpoint in workdir, data position included; SIGTERM saves a
checkpoint and returns; a NaN/Inf loss stops the run without saving the bad state.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any, NamedTuple

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from data.input_pipeline import DataConfig, make_datasets
from moe import optim, sharding
from moe.checkpoint import CheckpointError, Checkpointer, config_guard, load_run_configs
from moe.config import ModelConfig, model_config
from moe.metrics import MetricWriter, Progress
from moe.model import Transformer, objective


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 250
  learning_rate: float = 3e-3
  warmup_steps: int = 25
  decay_at: tuple[float, ...] = (0.8, 0.9)
  decay_factor: float = 0.316
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  log_every: int = 10
  eval_every: int = 50
  checkpoint_every: int = 50
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  seed: int = 0

  def __post_init__(self):
    for field in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, field) <= 0:
        raise ValueError(f"TrainConfig.{field}={getattr(self, field)!r} must be positive")
    if self.warmup_steps < 0 or self.learning_rate <= 0:
      raise ValueError(f"TrainConfig: learning_rate={self.learning_rate} must be positive and "
                       f"warmup_steps={self.warmup_steps} not negative")


class NonFiniteLossError(FloatingPointError):
  pass


class RunResult(NamedTuple):
  step: int
  status: str                  # 'finished', 'stopped' (stop_after_steps) or 'preempted'
  train_loss: float
  eval: dict[str, Any] | None  # eval_loss, eval_perplexity, layers
  unigram_entropy: float


# ---------------------------------------------------------------------------------------
# State and steps.

def schedule_of(train_cfg: TrainConfig):
  return optim.paper_schedule(train_cfg.learning_rate, train_cfg.steps, train_cfg.warmup_steps,
                              train_cfg.decay_at, train_cfg.decay_factor)


def create_state(model_cfg: ModelConfig, train_cfg: TrainConfig):
  """(graphdef, state) of (model, optimizer); state is what checkpoints hold."""
  model = Transformer(model_cfg, nnx.Rngs(train_cfg.seed))
  tx = optim.adamw(schedule_of(train_cfg), train_cfg.b1, train_cfg.b2, train_cfg.weight_decay,
                   train_cfg.clip_norm)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  return nnx.split((model, optimizer))


def abstract_state(model_cfg: ModelConfig, train_cfg: TrainConfig):
  """(graphdef, state of ShapeDtypeStructs): nothing is allocated."""
  graphdefs = []

  def init():
    graphdef, state = create_state(model_cfg, train_cfg)
    graphdefs.append(graphdef)
    return state

  state = jax.eval_shape(init)
  return graphdefs[0], state


def init_state(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh | None):
  """(graphdef, state): on one device, or created directly in its shards on the mesh."""
  if mesh is None:
    return create_state(model_cfg, train_cfg)
  graphdef, abstract = abstract_state(model_cfg, train_cfg)
  shardings = sharding.state_shardings(abstract, mesh)
  return graphdef, jax.jit(lambda: create_state(model_cfg, train_cfg)[1], out_shardings=shardings)()


def _objective(model, batch, key):
  return objective(model, batch["inputs"], batch["targets"], batch["weights"],
                   batch["segment_ids"], batch["positions"], key)


def _train_step(graphdef, mesh, state, batch, key):
  with sharding.use_mesh(mesh):
    model, optimizer = nnx.merge(graphdef, state)
    (loss, metrics), grads = nnx.value_and_grad(_objective, has_aux=True)(model, batch, key)
    optimizer.update(model, grads)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(nnx.state(model, nnx.Param)))
    return nnx.state((model, optimizer)), metrics


def eval_step(graphdef, mesh, state, batch):
  """-> (sum of weighted NLL, sum of weights, per-layer routing stats) of one batch."""
  with sharding.use_mesh(mesh):
    model, _ = nnx.merge(graphdef, state)
    _, metrics = _objective(model, batch, None)
    n = jnp.sum(batch["weights"])
    return metrics["lm_loss"] * n, n, metrics["layers"]


class Steps(NamedTuple):
  """Jitted steps for one (model, mesh). train(state, batch, key) -> (state, metrics)
  donates the state; eval(state, batch) -> (sum of weighted NLL, sum of weights, layer stats)."""
  train: Any
  eval: Any
  mesh: Mesh | None
  state_shardings: Any


def make_steps(graphdef, state, mesh: Mesh | None = None) -> Steps:
  """Train/eval steps; on a mesh with the state's shardings (from the rules) in and out,
  the batch split over the batch axes, metrics replicated. `state` may be abstract."""
  train = functools.partial(_train_step, graphdef, mesh)
  evaluate_ = functools.partial(eval_step, graphdef, mesh)
  if mesh is None:
    return Steps(jax.jit(train, donate_argnums=0), jax.jit(evaluate_), None, None)
  state_sh = sharding.state_shardings(state, mesh)
  batch_sh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  return Steps(
      jax.jit(train, in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep),
              donate_argnums=0),
      jax.jit(evaluate_, in_shardings=(state_sh, batch_sh), out_shardings=rep),
      mesh, state_sh)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh | None):
  """This host's rows of the global batch -> arrays split over the mesh's batch axes."""
  if mesh is None:
    return batch
  batch_sh = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in batch.items()}


def train_step(graphdef, state, batch, key):
  """One single-device step (benchmarks, notebooks); donates `state`."""
  return _single_device_steps(graphdef).train(state, batch, key)


@functools.lru_cache(maxsize=8)
def _single_device_steps(graphdef) -> Steps:
  return make_steps(graphdef, None)


def evaluate(steps: Steps, state, batches) -> dict[str, Any]:
  total = count = 0.0
  layers = []
  for batch in batches:
    nll, n, stats = steps.eval(state, put_batch(batch, steps.mesh))
    total, count = total + float(nll), count + float(n)
    layers.append(stats)
  loss = total / max(count, 1.0)
  mean_layers = jax.tree.map(lambda *a: np.mean(np.stack(a), axis=0), *layers) if layers else {}
  return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "layers": mean_layers}


# ---------------------------------------------------------------------------------------
# The loop.

class _StopFlag:
  """Set by SIGTERM (pre-emption): the loop saves a checkpoint and returns."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
  out = {k: float(v) for k, v in metrics.items() if k != "layers"}
  out["balance_loss"] = out["expert_balance_loss"] + out["device_balance_loss"]
  return out


def write_operative_config(workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "operative_config.gin"), "w") as f:
    f.write(gin.operative_config_str())


def train_and_evaluate(workdir: str, model_cfg: ModelConfig | None = None,
                       data_cfg: DataConfig | None = None, train_cfg: TrainConfig | None = None,
                       stop_after_steps: int | None = None, stream=None,
                       mesh_cfg: sharding.MeshConfig | None = None) -> RunResult:
  """Train (or resume) in workdir. Configs default to what gin binds.

  mesh_cfg: the device mesh (default: gin's MeshConfig; its default is one device).
  stop_after_steps: end this process after that many steps (with a checkpoint), as a
  time-sliced job would; a later call resumes exactly where it stopped.
  """
  # SIGTERM from here on (data preparation and compilation included) ends the run cleanly.
  with _StopFlag() as stop:
    return _train(workdir, model_cfg or model_config(), data_cfg or DataConfig(),
                  train_cfg or TrainConfig(), stop_after_steps, stream, stop,
                  sharding.make_mesh(mesh_cfg or sharding.MeshConfig()))


def _datasets(data_cfg: DataConfig, vocab_size: int, primary: bool):
  """This host's datasets. With several hosts, the first prepares (tfds, tokenizer, packed
  rows) while the others wait, then they read what it built."""
  args = (data_cfg, vocab_size, jax.process_index(), jax.process_count())
  if jax.process_count() == 1:
    return make_datasets(*args)
  data = make_datasets(*args) if primary else None
  multihost_utils.sync_global_devices("input pipeline prepared")
  return data or make_datasets(*args)


def _train(workdir, model_cfg, data_cfg, train_cfg, stop_after_steps, stream, stop, mesh) -> RunResult:
  sharding.check_batch(mesh, data_cfg.batch_size, "DataConfig.batch_size")
  primary = jax.process_index() == 0  # the one host that writes run files (orbax: all do)
  if primary:
    write_operative_config(workdir)
  config_guard(workdir, {"model": dataclasses.asdict(model_cfg), "data": dataclasses.asdict(data_cfg),
                         "train": dataclasses.asdict(train_cfg)}, write=primary)
  data = _datasets(data_cfg, model_cfg.vocab_size, primary)
  graphdef, state = init_state(model_cfg, train_cfg, mesh)
  steps = make_steps(graphdef, state, mesh)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), train_cfg.keep_checkpoints,
                      train_cfg.async_checkpoints)
  step = 0
  if ckpt.steps():
    step, restored, data_state = ckpt.restore(None, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, restored)
    data.train.set_state(data_state)
  start_step = step
  writer = MetricWriter(workdir, enabled=primary)
  progress = Progress(train_cfg.steps, step, stream)
  tokens_per_step = data_cfg.batch_size * data_cfg.seq_len
  schedule = schedule_of(train_cfg)
  base_key = jax.random.key(train_cfg.seed)
  last_saved = step if ckpt.steps() else None
  status, loss, eval_out = "finished", float("nan"), None
  stop_at = step + stop_after_steps if stop_after_steps else None
  t_log, steps_since_log = time.time(), 0

  def save(at_step):
    nonlocal last_saved
    ckpt.save(at_step, nnx.to_pure_dict(state), data.train.get_state())
    last_saved = at_step

  try:
    while step < train_cfg.steps:
      if stop.requested:  # before the first step: nothing new to save
        status = "preempted"
        break
      batch = next(data.train)
      state, metrics = steps.train(state, put_batch(batch, mesh), jax.random.fold_in(base_key, step))
      step += 1
      steps_since_log += 1
      loss = float(metrics["loss"])
      if not (math.isfinite(loss) and math.isfinite(float(metrics["param_norm"]))):
        ckpt.wait()
        good = ckpt.path(last_saved) if last_saved is not None else "none"
        what = f"loss is {loss}" if not math.isfinite(loss) else "the updated parameters are not finite"
        raise NonFiniteLossError(f"{what} at step {step}; stopping. The last good "
                                 f"checkpoint is {good}; nothing after it was saved")
      if step % train_cfg.log_every == 0 or step == train_cfg.steps:
        elapsed = time.time() - t_log
        scalars = _scalars(metrics)
        scalars["tokens_per_sec"] = tokens_per_step * steps_since_log / max(elapsed, 1e-9)
        scalars["learning_rate"] = float(schedule(step - 1))
        if step % train_cfg.eval_every == 0 or step == train_cfg.steps:
          eval_out = evaluate(steps, state, data.eval_batches)
          scalars.update(eval_loss=eval_out["eval_loss"], eval_perplexity=eval_out["eval_perplexity"])
        writer.write(step, scalars, metrics["layers"])
        extra = f" | eval {eval_out['eval_loss']:.3f}" if eval_out else ""
        progress.update(step, loss, scalars["tokens_per_sec"], extra)
        t_log, steps_since_log = time.time(), 0
      if step % train_cfg.checkpoint_every == 0 or step == train_cfg.steps:
        save(step)
      if stop.requested or step == stop_at:
        if last_saved != step:
          save(step)
        status = "preempted" if stop.requested else "stopped"
        break
  finally:
    progress.close()
    writer.close()
    ckpt.close()
  result = RunResult(step, status, loss, eval_out, data.unigram_entropy)
  if primary and step > start_step:  # a rerun of a finished run keeps its result
    write_result(workdir, result)
  return result


def write_result(workdir: str, result: RunResult) -> None:
  """workdir/result.json: how the last process of the run ended (sweeps read it)."""
  record = {"step": result.step, "status": result.status, "train_loss": result.train_loss,
            "unigram_entropy": result.unigram_entropy}
  if result.eval:
    record.update(eval_loss=result.eval["eval_loss"], eval_perplexity=result.eval["eval_perplexity"],
                  layers={k: np.asarray(v).tolist() for k, v in result.eval["layers"].items()})
  tmp = os.path.join(workdir, "result.json.tmp")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, os.path.join(workdir, "result.json"))


class RestoredRun(NamedTuple):
  model_cfg: ModelConfig
  data_cfg: DataConfig
  graphdef: Any
  state: Any  # (model, optimizer) state of the checkpoint
  step: int


def restore_run(workdir: str, step: int | None = None) -> RestoredRun:
  """A training run's checkpoint (default: the latest), with the run's own configs."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise CheckpointError(f"no checkpoint directory {ckpt_dir!r}: is {workdir!r} a training workdir?")
  configs = load_run_configs(workdir)
  model_cfg = ModelConfig(**_tuples(configs["model"]))
  graphdef, state = create_state(model_cfg, TrainConfig(**_tuples(configs["train"])))
  ckpt = Checkpointer(ckpt_dir, async_save=False)
  try:
    step, restored, _ = ckpt.restore(step, nnx.to_pure_dict(state))
  finally:
    ckpt.close()
  nnx.replace_by_pure_dict(state, restored)
  return RestoredRun(model_cfg, DataConfig(**_tuples(configs["data"])), graphdef, state, step)


def evaluate_checkpoint(workdir: str, step: int | None = None,
                        data_cfg: DataConfig | None = None) -> dict[str, Any]:
  """Restore a checkpoint of workdir (default: the latest) with the run's own model config
  and evaluate it on the held-out split (default: the run's data config)."""
  run = restore_run(workdir, step)
  data = make_datasets(data_cfg or run.data_cfg, run.model_cfg.vocab_size)
  out = evaluate(make_steps(run.graphdef, run.state), run.state, data.eval_batches)
  out.update(step=run.step, unigram_entropy=data.unigram_entropy)
  return out


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
  """JSON turned tuples into lists; frozen configs want them hashable again."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
