"""All of the analyses for one or more runs: a JSON-able dict of results, PNG plots and a
markdown report (what experiments/analyze.py writes)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from data.config import EMBEDDED
from data.input_pipeline import make_datasets
from data.code_categories import CATEGORIES
from moe.model.routers import ROUTERS
from moe.parallel.mesh import MeshConfig, make_mesh
from moe.parallel.rules import check_batch
from moe.research.analyses import (disable_top_experts, evaluate_with, vary_activated,
                                   without_shared_experts, without_token_dropping)
from moe.research.plots import plot_heatmap, plot_lines
from moe.research.specialization import lift, specialization
from moe.train.restore import restore_run


ANALYSES = ("redundancy", "redundancy_resoftmax", "redundancy_shared_off", "shared", "topk", "load",
            "categories", "drops")
# Figure 4's variants: {result key: (disable_top_experts keywords, table title)}
REDUNDANCY = {
    "redundancy": ({}, "Disabling each token's top-p routed experts"),
    "redundancy_resoftmax": ({"resoftmax": True}, "... with the gates re-softmaxed over the experts left"),
    "redundancy_shared_off": ({"drop_shared": True}, "... with the shared experts off as well"),
}


def analyze(workdirs: dict[str, str], out_dir: str, analyses=ANALYSES, max_tokens: int = 20_000,
            step: int | None = None, log=print, mesh_cfg: MeshConfig | None = None) -> dict[str, Any]:
  """{name: workdir} -> results per run (analyses that do not apply to a run are skipped),
  plots in out_dir; returns {name: {analysis: result}}. Each run's parameters are restored
  onto one device, or in their shards onto the mesh of `mesh_cfg` and evaluated there."""
  os.makedirs(out_dir, exist_ok=True)
  unknown = sorted(set(analyses) - set(ANALYSES))
  if unknown:
    raise ValueError(f"unknown analyses {unknown}; choose from {ANALYSES}")
  mesh = make_mesh(mesh_cfg) if mesh_cfg is not None else None
  results: dict[str, Any] = {}
  for name, workdir in workdirs.items():
    run = restore_run(workdir, step, mesh)
    cfg = run.model_cfg
    check_batch(mesh, run.data_cfg.batch_size, "DataConfig.batch_size")
    data = make_datasets(run.data_cfg, cfg.vocab_size)
    batches = data.eval_batches
    r: dict[str, Any] = {"model": cfg.name, "step": run.step}
    log(f"[{name}] {cfg.name} step {run.step}")
    base = evaluate_with(run, batches)
    r["loss"] = base["loss"]
    if cfg.is_moe_model:
      r["gate_mass"] = base["gate_mass"].tolist()
      if "load" in analyses:
        r["load"] = base["load"].tolist()
        plot_heatmap(os.path.join(out_dir, f"load_{name}.png"), base["load"], "expert", "MoE layer",
                     f"{name}: expert load (fraction of assignments)")
      for key, (kwargs, _) in REDUNDANCY.items():
        if key in analyses and cfg.router != "hash" and (cfg.n_shared_experts or "drop_shared" not in kwargs):
          r[key] = disable_top_experts(run, batches, **kwargs)
      if "shared" in analyses and cfg.n_shared_experts:
        r["shared"] = without_shared_experts(run, batches)
      if "drops" in analyses and not ROUTERS[cfg.router].dropless and cfg.capacity_factor > 0:
        r["drops"] = {"loss": base["loss"],
                      "loss_without_dropping": without_token_dropping(run, batches)}
      if "topk" in analyses and cfg.router == "topk":
        r["topk"] = vary_activated(run, batches)
      if "categories" in analyses and run.data_cfg.dataset == EMBEDDED:
        spec = specialization(run, max_tokens)
        r["categories"] = {"mutual_info_bits": spec.mutual_info.tolist(),
                           "normalized": spec.normalized.tolist(),
                           "token_id_bits": spec.token_id_info,
                           "token_id_normalized": spec.token_id_normalized,
                           "category_entropy_bits": spec.category_entropy,
                           "tokens": spec.tokens, "counts": spec.counts.tolist()}
        layer = int(np.argmax(spec.mutual_info))
        plot_heatmap(os.path.join(out_dir, f"categories_{name}.png"), lift(spec.counts[layer]),
                     "expert", "token category",
                     f"{name}, MoE layer {layer}: P(expert | category) / P(expert)",
                     yticklabels=CATEGORIES, cmap="magma")
    results[name] = r
  _comparison_plots(results, out_dir)
  return results


def _comparison_plots(results: dict[str, Any], out_dir: str) -> None:
  red = {n: [(p, loss) for p, _, loss in r["redundancy"]] for n, r in results.items() if "redundancy" in r}
  if red:
    plot_lines(os.path.join(out_dir, "redundancy.png"), red, "fraction of top routed experts disabled",
               "validation loss", "Disabling each token's top experts (paper Fig. 4)")
  topk = {n: r["topk"] for n, r in results.items() if "topk" in r}
  if topk:
    plot_lines(os.path.join(out_dir, "activated_experts.png"), topk,
               "activated routed experts at evaluation", "validation loss",
               "Activated experts at evaluation (paper Fig. 5)")


def report(results: dict[str, Any]) -> str:
  """Markdown tables of analyze()'s results."""
  lines = []
  for key, (_, title) in REDUNDANCY.items():
    red = {n: r[key] for n, r in results.items() if key in r}
    if not red:
      continue
    # The experts a fraction p masks depend on each run's expert count: named per cell.
    lines += [f"{title} (validation loss, experts masked):", "",
              "| run | " + " | ".join(f"p={p:.4g}" for p, _, _ in next(iter(red.values()))) + " |",
              "|---|" + "---:|" * len(next(iter(red.values())))]
    lines += [f"| {n} | " + " | ".join(f"{loss:.3f} ({m} off)" for _, m, loss in rows) + " |"
              for n, rows in red.items()]
    lines.append("")
  for n, r in results.items():
    if "shared" in r:
      lines.append(f"{n}: shared experts on {r['shared']['loss']:.3f} -> off with one more routed "
                   f"expert {r['shared']['loss_without_shared']:.3f}")
  for n, r in results.items():
    if "drops" in r:
      lines.append(f"{n}: with capacity-factor token dropping at evaluation {r['drops']['loss']:.3f}, "
                   f"without {r['drops']['loss_without_dropping']:.3f}")
  for n, r in results.items():
    if "topk" in r:
      lines += ["", f"{n}: activated routed experts at evaluation:", "",
                "| K | " + " | ".join(str(k) for k, _ in r["topk"]) + " |",
                "|---|" + "---:|" * len(r["topk"]),
                "| loss | " + " | ".join(f"{loss:.3f}" for _, loss in r["topk"]) + " |"]
  for n, r in results.items():
    if "categories" in r:
      c = r["categories"]
      lines += ["", f"{n}: I(token category; chosen expert) / H(category) per MoE layer "
                f"({c['tokens']} held-out tokens, H = {c['category_entropy_bits']:.3f} bits): "
                + ", ".join(f"{a:.3f}" for a in c["normalized"])
                + f"; token-id routing at the same N', K': {c['token_id_normalized']:.3f}"]
  for n, r in results.items():
    if "gate_mass" in r:
      lines.append(f"{n}: mean routed gate mass per token, per MoE layer: "
                   + ", ".join(f"{g:.3f}" for g in r["gate_mass"]))
  return "\n".join(lines)
