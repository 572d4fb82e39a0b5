"""The paper's expert-specialization analyses that re-route a trained model at evaluation:

- redundancy (Figure 4): rule out each token's top-p fraction of routed experts and route
  to the next K' best; a model whose experts are less redundant loses more; also with the
  gates re-softmaxed over the experts left, and with the shared experts off as well;
- shared experts off, one more routed expert on (Section 5.3: 1.808 -> 2.414 on the Pile);
- activated routed experts varied at evaluation (Figure 5);
- capacity routers (Switch, GShard) evaluated without token dropping (capacity factor 0:
  the dropless path with their gates).

Each evaluation traces the model afresh under a moe.model.intervention.Intervention.
"""

from __future__ import annotations

from typing import Any

import jax

from moe.model.intervention import Intervention, intervene
from moe.train.evaluate import evaluate
from moe.train.restore import RestoredRun
from moe.train.steps import Steps, eval_step


def evaluate_with(run: RestoredRun, batches, iv: Intervention = Intervention()) -> dict[str, Any]:
  """Held-out loss (nats/token) and expert load [n_moe_layers, N'] (None for a dense model)
  under an intervention: moe.train.evaluate with its eval step traced inside intervene()."""

  def step(params, batch):
    with intervene(iv):
      return eval_step(run.graphdef, run.mesh, params, batch)

  # A new jitted function each call: the intervention is read when tracing. On a mesh the
  # parameters stay in the shards they were restored into; evaluate splits the batch.
  steps = Steps(train=None, eval=jax.jit(step), mesh=run.mesh, state_shardings=None)
  out = evaluate(steps, run.params, batches)
  return {"loss": out["eval_loss"], "load": out["layers"].get("load"),
          "gate_mass": out["layers"].get("gate_mass")}


def require_moe(run: RestoredRun, what: str) -> None:
  if not run.model_cfg.is_moe_model:
    raise ValueError(f"{what} needs a MoE model; {run.model_cfg.name!r} is dense")


def disable_top_experts(run: RestoredRun, batches, fractions=(0, 1 / 16, 2 / 16, 3 / 16, 4 / 16),
                        resoftmax: bool = False, drop_shared: bool = False):
  """[(p, experts ruled out per token, loss)]: the top round(p * N') experts masked (the
  paper's Figure 4); `resoftmax`: the gates a softmax over the experts left; `drop_shared`:
  the shared experts off as well (p = 0 included)."""
  require_moe(run, "disabling top experts")
  if drop_shared and not run.model_cfg.n_shared_experts:
    raise ValueError(f"{run.model_cfg.name!r} has no shared experts to switch off")
  n = run.model_cfg.n_routed_experts
  out = []
  for p in fractions:
    masked = int(round(p * n))
    if masked + run.model_cfg.n_activated_experts > n:
      raise ValueError(f"p={p}: ruling out {masked} of {n} experts leaves fewer than "
                       f"K'={run.model_cfg.n_activated_experts}")
    iv = Intervention(mask_top=masked, resoftmax=resoftmax, drop_shared=drop_shared)
    out.append((p, masked, evaluate_with(run, batches, iv)["loss"]))
  return out


def without_shared_experts(run: RestoredRun, batches) -> dict[str, float]:
  """Loss as trained, and with the shared experts off and K'+1 routed experts."""
  cfg = run.model_cfg
  require_moe(run, "disabling shared experts")
  if not cfg.n_shared_experts:
    raise ValueError(f"{cfg.name!r} has no shared experts")
  base = evaluate_with(run, batches)["loss"]
  off = evaluate_with(run, batches, Intervention(drop_shared=True,
                                                 n_activated=cfg.n_activated_experts + 1))["loss"]
  return {"loss": base, "loss_without_shared": off}


def vary_activated(run: RestoredRun, batches, ks=None) -> list[tuple[int, float]]:
  """[(K at evaluation, loss)]; default K = 1 .. K'+2 (at most N')."""
  cfg = run.model_cfg
  require_moe(run, "varying activated experts")
  ks = ks or range(1, min(cfg.n_routed_experts, cfg.n_activated_experts + 2) + 1)
  return [(k, evaluate_with(run, batches, Intervention(n_activated=k))["loss"]) for k in ks]


def without_token_dropping(run: RestoredRun, batches) -> float:
  """Loss of a capacity router's model with no token dropped (capacity factor 0)."""
  require_moe(run, "evaluating without token dropping")
  return evaluate_with(run, batches, Intervention(capacity_factor=0.0))["loss"]
