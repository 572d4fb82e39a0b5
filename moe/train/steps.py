"""Jitted train and eval steps, on one device or with the rules' shardings on a mesh, and
the host's batch put onto the mesh."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from moe.model.loss import objective, real_tokens
from moe.parallel import rules
from moe.parallel.mesh import use_mesh


def batch_objective(model, batch, key, mask_padding: bool = True, token_losses: bool = False):
  """The training objective of one batch dict (inputs, targets, weights, segment_ids,
  positions) -> (loss, metrics); mask_padding: routing losses and statistics of the real
  tokens only (moe.model.loss.real_tokens); token_losses: each position's weighted NLL too."""
  return objective(model, batch["inputs"], batch["targets"], batch["weights"],
                   batch["segment_ids"], batch["positions"], key, mask_padding, token_losses)


def _train_objective(model, batch, key):
  # Training batches are fully packed (the split is concatenated, then cut): a mask would
  # change nothing but the rounding of masked sums, and runs reproduce bit for bit without.
  return batch_objective(model, batch, key, mask_padding=False)


def _train_step(graphdef, mesh, state, batch, key):
  with use_mesh(mesh):
    model, optimizer = nnx.merge(graphdef, state)
    (loss, metrics), grads = nnx.value_and_grad(_train_objective, has_aux=True)(model, batch, key)
    with jax.named_scope("optimizer"):  # names the update's share of a compiled step's time
      optimizer.update(model, grads)
    if "load" in metrics["layers"]:
      model.update_score_bias(jax.lax.stop_gradient(metrics["layers"]["load"]))
    param_norm = optax.tree.norm(nnx.state(model, nnx.Param))
    # Checked on device; the loop reads it only when it logs or saves (moe.train.loop).
    finite = jnp.isfinite(loss) & jnp.isfinite(param_norm)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), param_norm=param_norm,
                   finite=finite)
    return nnx.state((model, optimizer)), metrics


def eval_step(graphdef, mesh, state, batch):
  """-> (sum of weighted NLL, sum of weights, per-layer routing stats of the batch's real
  tokens, number of real tokens, [B, S] each position's weighted NLL) of one batch. `state`
  is of (model, optimizer) (training) or of the model alone (restored parameters)."""
  with use_mesh(mesh):
    merged = nnx.merge(graphdef, state)
    model = merged[0] if isinstance(merged, tuple) else merged
    _, metrics = batch_objective(model, batch, None, token_losses=True)
    n = jnp.sum(batch["weights"])
    tokens = jnp.sum(real_tokens(batch["segment_ids"], batch["weights"]).astype(jnp.float32))
    return metrics["lm_loss"] * n, n, metrics["layers"], tokens, metrics["token_nll"]


class Steps(NamedTuple):
  """Jitted steps for one (model, mesh). train(state, batch, key) -> (state, metrics)
  donates the state; eval(state, batch) -> (sum of weighted NLL, sum of weights, layer stats,
  real tokens, each position's weighted NLL) (eval_step)."""
  train: Any
  eval: Any
  mesh: Mesh | None
  state_shardings: Any


def make_steps(graphdef, state, mesh: Mesh | None = None) -> Steps:
  """Train/eval steps; on a mesh with the state's shardings (from the rules) in and out,
  the batch split over the batch axes, metrics replicated. `state` may be abstract, or the
  model's alone (restored parameters: then only eval applies)."""
  train = functools.partial(_train_step, graphdef, mesh)
  evaluate_ = functools.partial(eval_step, graphdef, mesh)
  if mesh is None:
    return Steps(jax.jit(train, donate_argnums=0), jax.jit(evaluate_), None, None)
  state_sh = rules.state_shardings(state, mesh)
  batch_sh, rep = rules.batch_sharding(mesh), rules.replicated(mesh)
  return Steps(
      jax.jit(train, in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep),
              donate_argnums=0),
      jax.jit(evaluate_, in_shardings=(state_sh, batch_sh), out_shardings=rep),
      mesh, state_sh)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh | None):
  """This host's rows of the global batch -> arrays split over the mesh's batch axes."""
  if mesh is None:
    return batch
  batch_sh = rules.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in batch.items()}


def train_step(graphdef, state, batch, key):
  """One single-device step (benchmarks, notebooks); donates `state`."""
  return _single_device_steps(graphdef).train(state, batch, key)


@functools.lru_cache(maxsize=8)
def _single_device_steps(graphdef) -> Steps:
  return make_steps(graphdef, None)
