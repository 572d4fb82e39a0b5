"""The training step of transformers' peer (moe.hub.torch_peer) with this codebase's
optimizer: what experiments/bench_train.py times against moe.train.steps.

    peer = build_peer(cfg, params)
    step = peer_train_step(peer, cfg, train_cfg)
    loss = step(*peer_batch(batch))      # one optimizer step; its LM loss

torch is imported inside the functions.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe.hub.hf_weights import sources
from moe.hub.torch_peer import peer_lm_loss, public_parts
from moe.model.config import ModelConfig
from moe.model.counts import abstract_params
from moe.train.config import TrainConfig
from moe.train.optim import decay_mask, schedule_of

# optax.adamw's eps, which moe.train.optim.adamw leaves at its default.
ADAM_EPS = inspect.signature(optax.adamw).parameters["eps"].default


def decayed_public_names(cfg: ModelConfig) -> dict[str, bool]:
  """{public tensor name: whether moe.train.optim.decay_mask decays the parameter it is a
  part of}, read off the model's abstract parameters (their logical axes decide)."""
  params = abstract_params(cfg)
  key = lambda k: getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
  by_path = {tuple(key(k) for k in path): bool(v)
             for path, v in jax.tree_util.tree_leaves_with_path(decay_mask(params)(params))}
  srcs = sources(cfg)
  if set(by_path) != set(srcs):
    raise ValueError(f"decay mask and public tensors disagree on the parameters: "
                     f"{sorted(set(by_path) ^ set(srcs), key=str)[:3]}")
  return {str(n): by_path[path] for path, src in srcs.items() for n in src.names.flat}


def peer_decay(peer, cfg: ModelConfig) -> dict[str, bool]:
  """{peer parameter name: decayed}; a stacked parameter's parts must agree."""
  decay = decayed_public_names(cfg)
  out = {}
  for name, (names, _) in public_parts(dict(peer.named_parameters())).items():
    kinds = {decay[n] for n in names if n in decay}
    if len(kinds) > 1:
      raise ValueError(f"peer parameter {name!r} stacks tensors the decay mask treats differently")
    out[name] = kinds.pop() if kinds else False  # none: a zero-size parameter
  return out


def learning_rates(train_cfg: TrainConfig) -> Callable[[int], float]:
  """step -> this codebase's learning rate at that step (optax counts from 0), read from a
  table computed in one call per stretch of steps, not one JAX call per step."""
  schedule = jax.vmap(schedule_of(train_cfg))
  table: list[float] = []

  def lr(step: int) -> float:
    while step >= len(table):
      table.extend(np.asarray(schedule(jnp.arange(len(table), len(table) + max(train_cfg.steps, 64)))).tolist())
    return table[step]

  return lr


def peer_train_step(peer, cfg: ModelConfig, train_cfg: TrainConfig) -> Callable[[Any, Any], Any]:
  """step(input_ids, labels) -> the step's LM loss (a detached scalar tensor): forward, the
  mean next-token cross-entropy of the labelled positions, backward, global-norm clipping,
  torch.optim.AdamW, zero_grad. The optimizer is this codebase's (moe.train.optim):
  - the same learning-rate schedule, betas, eps, weight decay and clip norm;
  - weight decay where moe.train.optim.decay_mask puts it (matrices), none on norm scales;
  - clipping as optax.clip_by_global_norm, grads x min(1, clip / norm): torch's
    clip_grad_norm_ divides by norm + 1e-6, so the scale is computed here instead.

  What the peer does NOT do that this codebase's step does: the auxiliary losses (expert
  balance; device balance, z and sequence-wise balance where their alphas are set) and their
  gradients, the per-layer routing statistics (load, entropy, gate mass, dropped fraction,
  ...), the grad and parameter norms and the finiteness flag in the step's metrics, and the
  selection-bias update of bias routers (none for 'topk'). With expert_balance_alpha 0 both
  minimise the same loss."""
  import torch

  decayed = peer_decay(peer, cfg)
  named = list(peer.named_parameters())
  params = [p for _, p in named]
  groups = [{"params": [p for n, p in named if decayed[n]], "weight_decay": train_cfg.weight_decay},
            {"params": [p for n, p in named if not decayed[n]], "weight_decay": 0.0}]
  lr_at = learning_rates(train_cfg)
  optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr_at(0),
                                betas=(train_cfg.b1, train_cfg.b2), eps=ADAM_EPS)
  count = 0

  def step(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    nonlocal count
    loss = peer_lm_loss(peer, input_ids, labels)
    loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    if len(grads) != len(params):  # AdamW would skip them, decay included; optax does not
      raise RuntimeError(f"{len(params) - len(grads)} peer parameter(s) got no gradient")
    norm = torch.nn.utils.get_total_norm(grads)
    torch._foreach_mul_(grads, (train_cfg.clip_norm / norm).clamp(max=1.0))
    for group in optimizer.param_groups:
      group["lr"] = lr_at(count)
    optimizer.step()
    optimizer.zero_grad()
    count += 1
    return loss.detach()

  return step
