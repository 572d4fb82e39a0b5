"""The training loop, importable from scripts and notebooks alike.

    result = train_and_evaluate(workdir)   # configs from gin (or passed in)

Resumes from the latest checkpoint in workdir, data position included; SIGTERM saves a
checkpoint and returns; a NaN/Inf loss stops the run without saving the bad state. A
finished run keeps its final parameters and per-document held-out losses
(moe.train.evaluate.keep_final_files).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from typing import Any, NamedTuple

import gin
import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from data.config import DataConfig
from data.input_pipeline import make_datasets
from moe.model.config import ModelConfig
from moe.model.counts import count_params
from moe.model.presets import model_config
from moe.parallel.mesh import MeshConfig, make_mesh
from moe.parallel.rules import check_batch
from moe.train.checkpoint import Checkpointer
from moe.train.config import TrainConfig
from moe.train.evaluate import agree_eval_batches, evaluate, keep_final_files
from moe.train.finetune import finetune_configs, load_into_state
from moe.train.metrics import MetricWriter, Progress
from moe.train.optim import schedule_of
from moe.train.profile import StepProfiler
from moe.train.run_files import (RunResult, check_run_configs, record_run_configs, run_configs_dict,
                                 write_operative_config, write_result)
from moe.train.state import init_state
from moe.train.steps import make_steps, put_batch
from moe.train.throughput import Throughput, peak_tflops


STOP_CHECK_EVERY = 5  # steps between the hosts' agreement on pre-emption (multi-host only)


class NonFiniteLossError(FloatingPointError):
  pass


class _StopFlag:
  """Set by SIGTERM (pre-emption): the loop saves a checkpoint and returns, on every host
  at the same step."""

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

  def agreed(self, step: int) -> bool:
    """Whether any host has been asked to stop, decided after `step`. With several hosts an
    all-gather of the flags, every STOP_CHECK_EVERY steps (it waits for the step to finish),
    so that every host stops after the same step: they save checkpoints collectively, and a
    host that stopped alone would leave the others waiting in the save."""
    if jax.process_count() == 1:
      return self.requested
    if step % STOP_CHECK_EVERY:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
  out = {k: float(v) for k, v in metrics.items() if k not in ("layers", "finite")}
  out["balance_loss"] = out["expert_balance_loss"] + out["device_balance_loss"]
  return out


class _Pending:
  """Steps dispatched but not yet checked. The host never waits for the step it just
  dispatched: it reads finiteness and losses only when it logs, saves or stops, and keeps
  at most `depth` steps in flight (each holds its batch), so it prepares the next batch
  while the device runs."""

  def __init__(self, depth: int = 2):
    self.depth, self.steps = depth, []

  def add(self, step: int, metrics: dict[str, Any]) -> None:
    self.steps.append((step, metrics))
    if len(self.steps) > self.depth:
      jax.block_until_ready(self.steps[-self.depth - 1][1]["finite"])

  def latest(self) -> Any:
    """The last dispatched step's loss (None when none is pending)."""
    return self.steps[-1][1]["loss"] if self.steps else None

  def check(self, upto: int | None = None) -> float | None:
    """Raises NonFiniteLossError naming the first bad step; the loss of the last step
    checked (None if none was pending). Checks the steps up to `upto` (default: all)."""
    now = [(s, m) for s, m in self.steps if upto is None or s <= upto]
    self.steps = self.steps[len(now):]
    fetched = jax.device_get([(s, m["loss"], m["finite"]) for s, m in now])
    for step, loss, finite in fetched:
      if not finite:
        what = f"loss is {loss}" if not math.isfinite(loss) else "the updated parameters are not finite"
        raise NonFiniteLossError(f"{what} at step {step}")
    return float(fetched[-1][1]) if fetched else None


class _LogEntry(NamedTuple):
  """A logged step's metrics, still on the device (copying to the host) until the next
  step has been dispatched; then written."""
  step: int
  metrics: dict[str, Any]
  extra: dict[str, float]  # tokens_per_sec, learning_rate, eval_loss, ...
  eval_out: dict[str, Any] | None


def train_and_evaluate(workdir: str, model_cfg: ModelConfig | None = None,
                       data_cfg: DataConfig | None = None, train_cfg: TrainConfig | None = None,
                       stop_after_steps: int | None = None, stream=None,
                       mesh_cfg: MeshConfig | None = None,
                       profile_steps: tuple[int, int] | None = None) -> RunResult:
  """Train (or resume) in workdir. Configs default to what gin binds.

  mesh_cfg: the device mesh (default: gin's MeshConfig; its default is one device).
  stop_after_steps: end this process after that many steps (with a checkpoint), as a
  time-sliced job would; a later call resumes exactly where it stopped.
  profile_steps: (first, last) steps to trace into workdir/profile (moe.train.profile).
  """
  # SIGTERM from here on (data preparation and compilation included) ends the run cleanly.
  with _StopFlag() as stop:
    return _train(workdir, model_cfg or model_config(), data_cfg or DataConfig(),
                  train_cfg or TrainConfig(), stop_after_steps, stream, stop,
                  make_mesh(mesh_cfg or MeshConfig()), StepProfiler(workdir, profile_steps))


def _datasets(data_cfg: DataConfig, vocab_size: int, primary: bool):
  """This host's datasets. With several hosts, the first prepares (tfds, tokenizer, packed
  rows) while the others wait, then they read what it built, and all agree on the number of
  eval batches."""
  args = (data_cfg, vocab_size, jax.process_index(), jax.process_count())
  if jax.process_count() == 1:
    return make_datasets(*args)
  data = make_datasets(*args) if primary else None
  multihost_utils.sync_global_devices("input pipeline prepared")
  return agree_eval_batches(data or make_datasets(*args), data_cfg)


def _train(workdir, model_cfg, data_cfg, train_cfg, stop_after_steps, stream, stop, mesh,
           profiler) -> RunResult:
  if train_cfg.init_from_hf:  # the checkpoint's architecture and tokenizer
    model_cfg, data_cfg = finetune_configs(train_cfg.init_from_hf, model_cfg, data_cfg)
  check_batch(mesh, data_cfg.batch_size, "DataConfig.batch_size")
  primary = jax.process_index() == 0  # the one host that writes run files (orbax: all do)
  configs = run_configs_dict(model_cfg, data_cfg, train_cfg)
  check_run_configs(workdir, configs)  # before anything is written: a refused start changes nothing
  data = _datasets(data_cfg, model_cfg.vocab_size, primary)
  graphdef, state = init_state(model_cfg, train_cfg, mesh)
  steps = make_steps(graphdef, state, mesh)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), train_cfg.keep_checkpoints,
                      train_cfg.async_checkpoints)
  step = 0
  if ckpt.steps():
    try:
      step, restored = ckpt.restore(None, nnx.to_pure_dict(state), data.train)
    except Exception:
      ckpt.close()  # orbax's threads, else they fail noisily as the interpreter exits
      data.train.close()
      raise
    nnx.replace_by_pure_dict(state, restored)
    if primary:
      print(f"restored step {step} from {ckpt.path(step)}", file=stream or sys.stdout, flush=True)
  elif train_cfg.init_from_hf:  # a new run starts from the checkpoint; a resumed one from its own
    load_into_state(state, train_cfg.init_from_hf, model_cfg, mesh)
  # Setup succeeded: a failed one leaves no record to refuse a fixed config, and the records
  # of the run it meant to resume as they were.
  if primary:
    write_operative_config(workdir)
    record_run_configs(workdir, configs)
  start_step = step
  writer = MetricWriter(workdir, enabled=primary)
  writer.text(step, "config/operative_gin", gin.operative_config_str())
  progress = Progress(train_cfg.steps, step, stream)
  tokens_per_step = data_cfg.batch_size * data_cfg.seq_len
  schedule = schedule_of(train_cfg)
  base_key = jax.random.key(train_cfg.seed)
  last_saved = step if ckpt.steps() else None
  status, loss, eval_out, final_nll = "finished", float("nan"), None, None
  stop_at = step + stop_after_steps if stop_after_steps else None
  speed = Throughput(step, tokens_per_step, count_params(model_cfg, data_cfg.seq_len).train_flops_per_token,
                     mesh.size if mesh is not None else 1, peak_tflops(jax.devices()[0].device_kind))

  pending = _Pending()
  due: _LogEntry | None = None

  def checked_loss(upto: int | None = None) -> float:
    """The pending steps' finiteness, read from the device; names the last good checkpoint."""
    try:
      last = pending.check(upto)
    except NonFiniteLossError as e:
      ckpt.wait()
      good = ckpt.path(last_saved) if last_saved is not None else "none"
      raise NonFiniteLossError(f"{e}; stopping. The last good checkpoint is {good}; nothing "
                               f"after it was saved") from None
    return loss if last is None else last

  def write_log():
    """Writes the due log entry (its step is done or nearly: a later one is queued)."""
    nonlocal due, loss
    if due is None:
      return
    loss = checked_loss(due.step)
    scalars = {**_scalars(due.metrics), **due.extra}
    writer.write(due.step, scalars, due.metrics["layers"])
    if due.eval_out:
      writer.evaluation(due.step, due.eval_out["layers"])
    extra = f" | eval {due.eval_out['eval_loss']:.3f}" if due.eval_out else ""
    progress.update(due.step, loss, scalars, extra)
    due = None

  def save(at_step):
    nonlocal last_saved, loss
    with speed.excluded(pending.latest()):
      write_log()
      loss = checked_loss()  # never save a state that went non-finite
      ckpt.save(at_step, nnx.to_pure_dict(state), data.train)
    last_saved = at_step

  if step >= train_cfg.steps:  # a finished run started again
    status = "nothing_to_do"
  try:
    if stop.agreed(step):  # before the first step: nothing new to save
      status = "preempted"
    while step < train_cfg.steps and status == "finished":
      batch = next(data.train)
      step_args = (state, put_batch(batch, mesh), jax.random.fold_in(base_key, step))
      profiler.before(step + 1, steps.train, step_args)
      state, metrics = steps.train(*step_args)
      step += 1
      profiler.after(step, metrics)
      pending.add(step, metrics)
      write_log()  # the previous logged step, now that this one is queued behind it
      eval_due = step % train_cfg.eval_every == 0 or step == train_cfg.steps
      if step % train_cfg.log_every == 0 or eval_due:  # each at its own interval
        extra = {**speed.measure(step, metrics["loss"]), "learning_rate": float(schedule(step - 1))}
        eval_now = None
        if eval_due:
          with speed.excluded(metrics["loss"]):  # the last one also yields each document's loss
            eval_out = eval_now = evaluate(steps, state, data.eval_batches,
                                           token_nll=step == train_cfg.steps)
          final_nll = eval_out.pop("token_nll", None)
          extra.update(eval_loss=eval_out["eval_loss"], eval_perplexity=eval_out["eval_perplexity"])
        for leaf in jax.tree.leaves(metrics):
          leaf.copy_to_host_async()
        due = _LogEntry(step, metrics, extra, eval_now)
      if step % train_cfg.checkpoint_every == 0 or step == train_cfg.steps:
        save(step)
      preempted = stop.agreed(step)
      if preempted or step == stop_at:
        if last_saved != step:
          save(step)
        status = "preempted" if preempted else "stopped"
        break
    write_log()
    loss = checked_loss()
  finally:
    data.train.close()  # stops its reading threads
    profiler.close()
    progress.close()
    writer.close()
    ckpt.close()
  if status in ("finished", "nothing_to_do") and step >= train_cfg.steps:  # final params, per-document losses
    keep_final_files(workdir, steps, graphdef, state, data.eval_batches, data.tokenizer.eos_id, step,
                     overwrite=step > start_step, token_nll=final_nll)
  result = RunResult(step, status, loss, eval_out, data.unigram_entropy)
  if primary and step > start_step:  # a rerun of a finished run keeps its result
    write_result(workdir, result)
  return result
