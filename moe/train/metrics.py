"""Run output: metrics.jsonl, TensorBoard event files, and a progress line for people."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import numpy as np


def _jsonable(v: Any) -> Any:
  a = np.asarray(v)
  if a.ndim == 0:
    x = a.item()
    return x if not isinstance(x, float) or math.isfinite(x) else str(x)
  return [_jsonable(x) for x in a]


def flatten_layers(layers: dict[str, Any]) -> dict[str, float]:
  """Per-layer routing stats -> scalars 'moe/layer{i}/{name}' (expert loads summarised)."""
  out = {}
  for name, values in layers.items():
    values = np.asarray(values)
    if values.ndim != 1:
      continue  # [n_layers, n_experts] (load, score_bias): in metrics.jsonl only
    for i, v in enumerate(values):
      out[f"moe/layer{i}/{name}"] = float(v)
  return out


def token_weighted_mean(stats: list[dict[str, Any]], tokens: list[float]) -> dict[str, np.ndarray]:
  """Per-batch routing statistics (each of its batch's real tokens) -> their mean weighted
  by each batch's real tokens: for the statistics linear in the tokens (load, router
  entropy, gate mass, dropped fraction) those of all the batches' real tokens together.
  Batches of padding only weigh nothing (all of them: the plain mean)."""
  if not stats:
    return {}
  w = np.asarray(tokens, np.float64)
  w = w / np.sum(w) if np.sum(w) > 0 else np.full(len(w), 1.0 / len(w))

  def mean(values):
    a = np.stack([np.asarray(v) for v in values])
    return np.tensordot(w, a.astype(np.float64), axes=1).astype(np.result_type(a.dtype, np.float32))

  return {k: mean([s[k] for s in stats]) for k in stats[0]}


PERF = ("tokens_per_sec", "step_time_s", "tflops_per_sec_per_device", "mfu")


def tensorboard_tag(name: str) -> str:
  """TensorBoard's grouping, as t5x and MaxText lay it out: eval/*, perf/*, train/*
  (per-layer statistics are already moe/layer{i}/*)."""
  if name.startswith("moe/"):
    return name
  if name.startswith("eval_"):
    return "eval/" + name[len("eval_"):]
  return ("perf/" if name in PERF else "train/") + name


def load_image(load: Any) -> np.ndarray:
  """[n_layers, n_experts] expert loads (1 = balanced) -> a [1, H, W, 1] uint8 heatmap,
  each cell 8x8 pixels, white at the most loaded expert."""
  a = np.asarray(load, np.float32)
  a = a / max(float(a.max()), 1e-9)
  cells = np.kron(a, np.ones((8, 8), np.float32))
  return (cells * 255).astype(np.uint8)[None, :, :, None]


def tensorboard_scalars(directory: str, step: int, scalars: dict[str, float]) -> bool:
  """Scalars at `step` into TensorBoard files in `directory` (tags as tensorboard_tag);
  False when TensorFlow is not importable."""
  try:
    import tensorflow as tf
  except ImportError:
    return False
  writer = tf.summary.create_file_writer(directory)
  with writer.as_default(step=int(step)):
    for k, v in scalars.items():
      tf.summary.scalar(tensorboard_tag(k), float(v))
  writer.close()
  return True


class MetricWriter:
  """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to
  TensorBoard (workdir/tensorboard), when TensorFlow is importable. Disabled (every call
  a no-op) on all but the first host of a multi-host job."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    try:
      import tensorflow as tf
      tf.config.set_visible_devices([], "GPU")  # leave accelerators to JAX
      self.tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
    except ImportError:
      self.tb = None

  def write(self, step: int, scalars: dict[str, Any], layers: dict[str, Any] | None = None) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _jsonable(v) for k, v in scalars.items()}}
    if layers:
      record["layers"] = {k: _jsonable(v) for k, v in layers.items()}
    self.jsonl.write(json.dumps(record) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      import tensorflow as tf
      with self.tb.as_default(step=int(step)):
        for k, v in {**scalars, **flatten_layers(layers or {})}.items():
          if np.ndim(v) == 0:
            tf.summary.scalar(tensorboard_tag(k), float(v))
      self.tb.flush()

  def evaluation(self, step: int, layers: dict[str, Any]) -> None:
    """TensorBoard: the evaluation's per-layer expert loads as a heatmap image."""
    if not self.enabled or self.tb is None or "load" not in layers:
      return
    import tensorflow as tf
    with self.tb.as_default(step=int(step)):
      tf.summary.image("moe/expert_load", load_image(layers["load"]),
                       description="rows: MoE layers, columns: routed experts; white: most loaded")
    self.tb.flush()

  def text(self, step: int, tag: str, text: str) -> None:
    """TensorBoard text (e.g. the operative gin config), as preformatted markdown."""
    if not self.enabled or self.tb is None:
      return
    import tensorflow as tf
    with self.tb.as_default(step=int(step)):
      tf.summary.text(tag, "```\n" + text + "\n```")
    self.tb.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self.jsonl.close()
    if self.tb is not None:
      self.tb.close()


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"


def _speed(speed: dict[str, float]) -> str:
  """12.3k tok/s | 166 ms/step | 1.02 TFLOP/s/device (| MFU 41.2%)"""
  out = (f"{speed['tokens_per_sec'] / 1000:.1f}k tok/s | {speed['step_time_s'] * 1000:.0f} ms/step | "
         f"{speed['tflops_per_sec_per_device']:.3g} TFLOP/s/device")
  return out + (f" | MFU {100 * speed['mfu']:.1f}%" if "mfu" in speed else "")


class Progress:
  """`step 120/300 [#####.....] loss 4.12 | 12.3k tok/s | 166 ms/step | ... | ETA 2m13s`,
  redrawn in place on a terminal, one line per update elsewhere (logs, notebooks)."""

  def __init__(self, total_steps: int, start_step: int = 0, stream=None):
    self.total, self.start = total_steps, start_step
    self.stream = stream or sys.stdout
    self.t0 = time.time()
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

  def update(self, step: int, loss: float, speed: dict[str, float], extra: str = "") -> None:
    """speed: moe.train.throughput.Throughput.measure's (tokens_per_sec, step_time_s, ...)."""
    done = step - self.start
    rate = done / max(time.time() - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    width = 20
    filled = int(width * step / max(self.total, 1))
    line = (f"step {step}/{self.total} [{'#' * filled}{'.' * (width - filled)}] "
            f"loss {loss:.4f} | {_speed(speed)} | "
            f"ETA {_duration(eta) if math.isfinite(eta) else '?'}{extra}")
    self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.tty:
      self.stream.write("\n")
      self.stream.flush()
