"""The paper's expert-specialization analyses, over a trained run's checkpoint.

- redundancy (Figure 4): rule out each token's top-p fraction of routed experts and route
  to the next K' best; a model whose experts are less redundant loses more;
- shared experts off, one more routed expert on (Section 5.3: 1.808 -> 2.414 on the Pile);
- activated routed experts varied at evaluation (Figure 5);
- capacity routers (Switch, GShard) evaluated without token dropping;
- expert load per layer;
- specialization by token category (comment, docstring, identifier, ... of the embedded
  Python corpus): mutual information between a token's category and its chosen experts,
  against the same statistic with categories shuffled.

Each evaluation traces the model afresh under a moe_layer.Intervention.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from data import input_pipeline
from data.code_categories import CATEGORIES, token_categories
from moe import trainer
from moe.moe_layer import ROUTERS, Intervention, intervene
from moe.trainer import RestoredRun


def evaluate_with(run: RestoredRun, batches, iv: Intervention = Intervention()) -> dict[str, Any]:
  """Held-out loss (nats/token) and expert load [n_moe_layers, N'] (None for a dense model)
  under an intervention: trainer.evaluate with its eval step traced inside intervene()."""

  def step(state, batch):
    with intervene(iv):
      return trainer.eval_step(run.graphdef, None, state, batch)

  # A new jitted function each call: the intervention is read when tracing.
  steps = trainer.Steps(train=None, eval=jax.jit(step), mesh=None, state_shardings=None)
  out = trainer.evaluate(steps, run.state, batches)
  return {"loss": out["eval_loss"], "load": out["layers"].get("load")}


def _require_moe(run: RestoredRun, what: str) -> None:
  if not run.model_cfg.is_moe_model:
    raise ValueError(f"{what} needs a MoE model; {run.model_cfg.name!r} is dense")


def disable_top_experts(run: RestoredRun, batches, fractions=(0, 1 / 16, 2 / 16, 3 / 16, 4 / 16)):
  """[(p, experts ruled out per token, loss)]: the top round(p * N') experts masked."""
  _require_moe(run, "disabling top experts")
  n = run.model_cfg.n_routed_experts
  out = []
  for p in fractions:
    masked = int(round(p * n))
    if masked + run.model_cfg.n_activated_experts > n:
      raise ValueError(f"p={p}: ruling out {masked} of {n} experts leaves fewer than "
                       f"K'={run.model_cfg.n_activated_experts}")
    out.append((p, masked, evaluate_with(run, batches, Intervention(mask_top=masked))["loss"]))
  return out


def without_shared_experts(run: RestoredRun, batches) -> dict[str, float]:
  """Loss as trained, and with the shared experts off and K'+1 routed experts."""
  cfg = run.model_cfg
  _require_moe(run, "disabling shared experts")
  if not cfg.n_shared_experts:
    raise ValueError(f"{cfg.name!r} has no shared experts")
  base = evaluate_with(run, batches)["loss"]
  off = evaluate_with(run, batches, Intervention(drop_shared=True,
                                                 n_activated=cfg.n_activated_experts + 1))["loss"]
  return {"loss": base, "loss_without_shared": off}


def vary_activated(run: RestoredRun, batches, ks=None) -> list[tuple[int, float]]:
  """[(K at evaluation, loss)]; default K = 1 .. K'+2 (at most N')."""
  cfg = run.model_cfg
  _require_moe(run, "varying activated experts")
  ks = ks or range(1, min(cfg.n_routed_experts, cfg.n_activated_experts + 2) + 1)
  return [(k, evaluate_with(run, batches, Intervention(n_activated=k))["loss"]) for k in ks]


# ---------------------------------------------------------------------------------------
# Specialization by token category.

class Specialization(NamedTuple):
  counts: np.ndarray          # [n_moe_layers, len(CATEGORIES), N'] (token, choice) pairs
  mutual_info: np.ndarray     # [n_moe_layers] I(category; expert) in bits
  shuffled_info: np.ndarray   # [n_moe_layers] the same with categories shuffled over tokens
  tokens: int


def category_rows(run: RestoredRun, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """Held-out documents of the run's (embedded Python) corpus as model rows:
  (ids [R, seq_len], categories [R, seq_len], -1 = padding)."""
  cfg = run.data_cfg
  tok = input_pipeline.tokenizer_for(cfg)
  ids, cats = [], []
  for text in input_pipeline.documents(cfg, cfg.eval_split):
    i, c = token_categories(tok.sp, text)
    ids.append(i)
    cats.append(c)
    if sum(len(x) for x in ids) >= max_tokens:
      break
  if not ids:
    raise ValueError(f"no held-out documents in {cfg.dataset!r} split {cfg.eval_split!r}")
  ids, cats = np.concatenate(ids)[:max_tokens], np.concatenate(cats)[:max_tokens]
  s = cfg.seq_len
  pad = -len(ids) % s
  ids = np.concatenate([ids, np.zeros(pad, np.int32)]).reshape(-1, s)
  cats = np.concatenate([cats, np.full(pad, -1, np.int8)]).reshape(-1, s)
  return ids, cats


def mutual_information(counts: np.ndarray) -> float:
  """counts: [C, E] joint counts -> I(C; E) in bits."""
  p = counts / max(counts.sum(), 1)
  pc, pe = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
  nz = p > 0
  return float(np.sum(p[nz] * np.log2(p[nz] / (pc @ pe)[nz])))


def specialization(run: RestoredRun, max_tokens: int = 20_000, batch_size: int = 16,
                   seed: int = 0) -> Specialization:
  _require_moe(run, "routing specialization")
  ids, cats = category_rows(run, max_tokens)

  @jax.jit
  def choices(state, tokens):
    with intervene(Intervention(capture=True)):
      model, _ = nnx.merge(run.graphdef, state)
      _, aux = model(tokens)
      return aux["layers"]["expert_idx"]  # [L, B*S, K']

  n_layers, n_cat, n_exp = run.model_cfg.n_moe_layers, len(CATEGORIES), run.model_cfg.n_routed_experts
  counts = np.zeros((n_layers, n_cat, n_exp), np.int64)
  shuffled = np.zeros_like(counts)
  perm_cats = cats.reshape(-1).copy()
  valid = perm_cats >= 0
  perm_cats[valid] = np.random.default_rng(seed).permutation(perm_cats[valid])
  perm_cats = perm_cats.reshape(cats.shape)
  for start in range(0, len(ids), batch_size):
    rows = ids[start:start + batch_size]
    pad = batch_size - len(rows)  # one compiled shape for every batch
    idx = np.asarray(choices(run.state, np.concatenate([rows, np.zeros((pad, rows.shape[1]), np.int32)])))
    idx = idx[:, :len(rows) * rows.shape[1]]
    for table, c in ((counts, cats), (shuffled, perm_cats)):
      c = c[start:start + batch_size].reshape(-1)
      keep = c >= 0
      for layer in range(n_layers):
        chosen = idx[layer][keep]                                   # [T, K']
        np.add.at(table[layer], (np.repeat(c[keep], chosen.shape[1]), chosen.reshape(-1)), 1)
  return Specialization(counts, np.array([mutual_information(c) for c in counts]),
                        np.array([mutual_information(c) for c in shuffled]), int((cats >= 0).sum()))


# ---------------------------------------------------------------------------------------
# Plots (matplotlib, written as PNG files).

@functools.cache
def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_lines(path: str, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
               title: str) -> None:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, points in series.items():
    ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  ax.grid(alpha=0.3)
  if len(series) > 1:
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_heatmap(path: str, values: np.ndarray, xlabel: str, ylabel: str, title: str,
                 yticklabels=None, cmap: str = "viridis") -> None:
  plt = _plt()
  from matplotlib.ticker import MaxNLocator
  fig, ax = plt.subplots(figsize=(max(6.5, values.shape[1] * 0.12 + 2.5),
                                  max(2.5, values.shape[0] * 0.35 + 1.4)))
  im = ax.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  if yticklabels is not None:
    ax.set_yticks(range(len(yticklabels)), yticklabels)
  else:
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def lift(counts: np.ndarray) -> np.ndarray:
  """[C, E] counts -> P(expert | category) / P(expert): > 1 where a category prefers an expert."""
  p_e = counts.sum(0) / max(counts.sum(), 1)
  p_e_c = counts / np.maximum(counts.sum(1, keepdims=True), 1)
  return np.where(p_e > 0, p_e_c / np.maximum(p_e, 1e-12), 0.0)


# ---------------------------------------------------------------------------------------
# All of it, for one or more runs: a JSON-able dict, a markdown report and PNG plots.

ANALYSES = ("redundancy", "shared", "topk", "load", "categories", "drops")


def analyze(workdirs: dict[str, str], out_dir: str, analyses=ANALYSES, max_tokens: int = 20_000,
            step: int | None = None, log=print) -> dict[str, Any]:
  """{name: workdir} -> results per run (analyses that do not apply to a run are skipped),
  plots in out_dir; returns {name: {analysis: result}}."""
  import os

  os.makedirs(out_dir, exist_ok=True)
  unknown = sorted(set(analyses) - set(ANALYSES))
  if unknown:
    raise ValueError(f"unknown analyses {unknown}; choose from {ANALYSES}")
  results: dict[str, Any] = {}
  for name, workdir in workdirs.items():
    run = trainer.restore_run(workdir, step)
    cfg = run.model_cfg
    data = input_pipeline.make_datasets(run.data_cfg, cfg.vocab_size)
    batches = data.eval_batches
    r: dict[str, Any] = {"model": cfg.name, "step": run.step}
    log(f"[{name}] {cfg.name} step {run.step}")
    base = evaluate_with(run, batches)
    r["loss"] = base["loss"]
    if cfg.is_moe_model:
      if "load" in analyses:
        r["load"] = base["load"].tolist()
        plot_heatmap(os.path.join(out_dir, f"load_{name}.png"), base["load"], "expert", "MoE layer",
                     f"{name}: expert load (fraction of assignments)")
      if "redundancy" in analyses and cfg.router != "hash":
        r["redundancy"] = disable_top_experts(run, batches)
      if "shared" in analyses and cfg.n_shared_experts:
        r["shared"] = without_shared_experts(run, batches)
      if "drops" in analyses and not ROUTERS[cfg.router].dropless:
        # A factor of N' gives every expert room for every token: nothing is dropped.
        r["drops"] = {"loss": base["loss"], "loss_without_dropping": evaluate_with(
            run, batches, Intervention(capacity_factor=float(cfg.n_routed_experts)))["loss"]}
      if "topk" in analyses and cfg.router == "topk":
        r["topk"] = vary_activated(run, batches)
      if "categories" in analyses and run.data_cfg.dataset == input_pipeline.EMBEDDED:
        spec = specialization(run, max_tokens)
        r["categories"] = {"mutual_info_bits": spec.mutual_info.tolist(),
                           "shuffled_mutual_info_bits": spec.shuffled_info.tolist(),
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
  import os

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
  red = {n: r["redundancy"] for n, r in results.items() if "redundancy" in r}
  if red:
    lines += ["Disabling each token's top-p routed experts (validation loss):", "",
              "| run | " + " | ".join(f"p={p:.4g} ({m} off)" for p, m, _ in next(iter(red.values()))) + " |",
              "|---|" + "---:|" * len(next(iter(red.values())))]
    lines += [f"| {n} | " + " | ".join(f"{loss:.3f}" for _, _, loss in rows) + " |" for n, rows in red.items()]
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
      lines += ["", f"{n}: I(token category; chosen expert) per MoE layer, bits "
                f"({c['tokens']} held-out tokens; shuffled categories in brackets): "
                + ", ".join(f"{a:.3f} [{b:.3f}]" for a, b in zip(c["mutual_info_bits"], c["shuffled_mutual_info_bits"]))]
  return "\n".join(lines)
