"""Specialization by token category: each held-out token of the embedded Python corpus is
a comment, docstring, string, keyword, identifier, number, operator or whitespace; the
mutual information between a token's category and its chosen experts, per MoE layer.

Two corrections make it comparable across models. The null is token-id routing: each
token id sent to a fixed random set of K' of the N' experts (what a Hash layer does), which
carries category information because the category is largely a function of the token; a
learned router specialises only by what it adds over that. And the information is
normalised by the category entropy H(C) (the most any routing can carry), with the null
computed at each model's own N' and K'.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from data.documents import documents
from data.input_pipeline import tokenizer_for
from data.code_categories import CATEGORIES, token_categories
from moe.model.intervention import Intervention, intervene
from moe.parallel.mesh import use_mesh
from moe.parallel.rules import check_batch
from moe.research.analyses import require_moe
from moe.train.restore import RestoredRun
from moe.train.steps import put_batch


class Specialization(NamedTuple):
  counts: np.ndarray          # [n_moe_layers, len(CATEGORIES), N'] (token, choice) pairs
  mutual_info: np.ndarray     # [n_moe_layers] I(category; expert) in bits
  token_id_info: float        # the same for token-id routing at this N', K' (mean of seeds)
  category_entropy: float     # H(category) in bits over the same tokens
  tokens: int

  @property
  def normalized(self) -> np.ndarray:
    """[n_moe_layers] I(C; E) / H(C)."""
    return self.mutual_info / self.category_entropy

  @property
  def token_id_normalized(self) -> float:
    return self.token_id_info / self.category_entropy


def category_rows(run: RestoredRun, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """Held-out documents of the run's (embedded Python) corpus as model rows:
  (ids [R, seq_len], categories [R, seq_len], -1 = padding)."""
  cfg = run.data_cfg
  tok = tokenizer_for(cfg)
  ids, cats = [], []
  for text in documents(cfg, cfg.eval_split):
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


def entropy_bits(counts: np.ndarray) -> float:
  p = counts[counts > 0] / max(counts.sum(), 1)
  return float(-np.sum(p * np.log2(p)))


def token_id_routing_counts(ids: np.ndarray, cats: np.ndarray, vocab_size: int, n_experts: int,
                            k: int, seed: int) -> np.ndarray:
  """[C, N'] (category, expert) counts when every token id goes to a fixed random set of k
  distinct experts. ids, cats: [T] (cats -1 = padding, left out)."""
  table = np.argsort(np.random.default_rng(seed).random((vocab_size, n_experts)), axis=1)[:, :k]
  keep = cats >= 0
  counts = np.zeros((len(CATEGORIES), n_experts), np.int64)
  np.add.at(counts, (np.repeat(cats[keep], k), table[ids[keep]].reshape(-1)), 1)
  return counts


def specialization(run: RestoredRun, max_tokens: int = 20_000, batch_size: int = 16,
                   null_seeds: int = 3) -> Specialization:
  require_moe(run, "routing specialization")
  check_batch(run.mesh, batch_size, "specialization batch_size")
  ids, cats = category_rows(run, max_tokens)

  @jax.jit
  def choices(params, tokens):
    with intervene(Intervention(capture=True)), use_mesh(run.mesh):
      _, aux = nnx.merge(run.graphdef, params)(tokens)
      return aux["layers"]["expert_idx"]  # [L, B*S, K']

  n_layers, n_cat, n_exp = run.model_cfg.n_moe_layers, len(CATEGORIES), run.model_cfg.n_routed_experts
  counts = np.zeros((n_layers, n_cat, n_exp), np.int64)
  for start in range(0, len(ids), batch_size):
    rows = ids[start:start + batch_size]
    pad = batch_size - len(rows)  # one compiled shape for every batch
    tokens = np.concatenate([rows, np.zeros((pad, rows.shape[1]), np.int32)])
    idx = np.asarray(choices(run.params, put_batch({"tokens": tokens}, run.mesh)["tokens"]))
    idx = idx[:, :len(rows) * rows.shape[1]]
    c = cats[start:start + batch_size].reshape(-1)
    keep = c >= 0
    for layer in range(n_layers):
      chosen = idx[layer][keep]                                   # [T, K']
      np.add.at(counts[layer], (np.repeat(c[keep], chosen.shape[1]), chosen.reshape(-1)), 1)
  k = run.model_cfg.n_activated_experts
  null = np.mean([mutual_information(token_id_routing_counts(
      ids.reshape(-1), cats.reshape(-1), run.model_cfg.vocab_size, n_exp, k, seed))
      for seed in range(null_seeds)])
  cat_counts = np.bincount(cats[cats >= 0].astype(np.int64), minlength=n_cat)
  return Specialization(counts, np.array([mutual_information(c) for c in counts]), float(null),
                        entropy_bits(cat_counts), int((cats >= 0).sum()))


def lift(counts: np.ndarray) -> np.ndarray:
  """[C, E] counts -> P(expert | category) / P(expert): > 1 where a category prefers an expert."""
  p_e = counts.sum(0) / max(counts.sum(), 1)
  p_e_c = counts / np.maximum(counts.sum(1, keepdims=True), 1)
  return np.where(p_e > 0, p_e_c / np.maximum(p_e, 1e-12), 0.0)
