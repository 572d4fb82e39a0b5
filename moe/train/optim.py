"""The paper's optimizer: AdamW (no weight decay on norm scales), linear warmup, two x0.316
steps, global-norm clipping."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe.train.config import TrainConfig


def paper_schedule(peak_lr: float, total_steps: int, warmup_steps: int,
                   decay_at: tuple[float, ...] = (0.8, 0.9), decay_factor: float = 0.316):
  """Linear warmup from 0 to peak_lr, then x decay_factor at each fraction in decay_at.

  lr(step) for step in [0, warmup): peak * (step + 1) / warmup, so the first update is
  not zero; afterwards peak * factor ** (number of boundaries <= step).
  """
  # numpy, not jnp: the schedule may be built under a trace (abstract state for AOT plans).
  boundaries = np.array([int(f * total_steps) for f in decay_at], np.int32)

  def schedule(step):
    step = jnp.asarray(step, jnp.int32)
    warm = peak_lr * jnp.minimum(1.0, (step + 1) / max(warmup_steps, 1))
    return warm * decay_factor ** jnp.sum(step >= boundaries).astype(jnp.float32)

  return schedule


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def decay_mask(params: nnx.State) -> Callable[[Any], Any]:
  """Weight decay on matrices only, judged by logical axes: a parameter is decayed iff it
  has two or more axes besides the 'layers' axis that stacking adds, so norm scales ([d],
  or [layers, d] in a layer stack) are not.

  params: the model's nnx.Param state, whose `axes` metadata decides. optax calls the
  returned mask with bare arrays at each update, so it looks the decisions up by path.
  """
  def decayed(var: nnx.Variable) -> bool:
    axes = var.get_metadata().get("axes")
    if axes is None:
      raise ValueError(f"parameter of shape {var.shape} has no logical axes to decide weight decay by")
    return sum(a != "layers" for a in axes) >= 2

  by_path = {jax.tree_util.keystr(path): decayed(var) for path, var
             in jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_variable)}

  def mask(tree):
    return jax.tree_util.tree_map_with_path(lambda path, _: by_path[jax.tree_util.keystr(path)], tree,
                                            is_leaf=_is_variable)
  return mask


def adamw(schedule, decay_mask, b1: float = 0.9, b2: float = 0.95, weight_decay: float = 0.1,
          clip_norm: float = 1.0) -> optax.GradientTransformation:
  """decay_mask: which parameters weight decay applies to (optax's `mask`)."""
  return optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask),
  )


def schedule_of(train_cfg: TrainConfig):
  return paper_schedule(train_cfg.learning_rate, train_cfg.steps, train_cfg.warmup_steps,
                         train_cfg.decay_at, train_cfg.decay_factor)


def optimizer_of(train_cfg: TrainConfig, params: nnx.State) -> optax.GradientTransformation:
  """The paper's AdamW for the model whose nnx.Param state is `params`."""
  return adamw(schedule_of(train_cfg), decay_mask(params), train_cfg.b1, train_cfg.b2,
               train_cfg.weight_decay, train_cfg.clip_norm)
