"""Parameter and FLOP counts from the model's abstract parameters (nothing is allocated)."""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from moe.model.config import ModelConfig
from moe.model.decoder import Transformer


def abstract_params(cfg: ModelConfig) -> nnx.State:
  """The model's nnx.Param state as ShapeDtypeStructs (via jax.eval_shape)."""
  model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  return nnx.state(model, nnx.Param)


@dataclasses.dataclass(frozen=True)
class ParamCount:
  total: int
  activated: int            # parameters one token passes through
  embedding: int            # the input embedding table (a lookup, not a matmul)
  train_flops_per_token: float

  @property
  def forward_flops_per_token(self) -> float:
    return self.train_flops_per_token / 3


def count_params(cfg: ModelConfig, seq_len: int | None = None) -> ParamCount:
  """Totals over the abstract parameters; a token activates K' of the N' routed experts.

  Training FLOPs per token follow the PaLM convention, 6 * (activated matmul params) +
  12 * n_layers * d_model * seq_len for attention scores and values.
  """
  total = routed = embedding = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params(cfg)):
    size = math.prod(leaf.shape)
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    total += size
    if "experts" in names:
      routed += size
    if names[0] == "embed":
      embedding += size
  activated = total - routed
  if cfg.is_moe_model:
    activated += routed * cfg.n_activated_experts // cfg.n_routed_experts
  seq_len = seq_len or cfg.max_seq_len
  flops = 6 * (activated - embedding) + 12 * cfg.n_layers * cfg.d_model * seq_len
  return ParamCount(total, activated, embedding, float(flops))


@dataclasses.dataclass(frozen=True)
class Shares:
  """Fractions of all parameters and of the training FLOPs per token (PaLM convention as
  count_params) held by the vocabulary (embedding + LM head), the FFNs (dense, shared and
  routed experts, routers) and attention."""
  vocab_params: float
  ffn_params: float
  attention_params: float
  head_flops: float
  ffn_flops: float
  attention_flops: float   # projections and scores


def shares(cfg: ModelConfig, seq_len: int | None = None) -> Shares:
  sizes = {"vocab": 0, "ffn": 0, "attn": 0, "routed": 0, "head": 0}
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params(cfg)):
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    size = math.prod(leaf.shape)
    if names[0] in ("embed", "lm_head"):
      sizes["vocab"] += size
      sizes["head"] += size if names[0] == "lm_head" else 0
    elif "ffn" in names:
      sizes["ffn"] += size
      sizes["routed"] += size if "experts" in names else 0
    elif "attn" in names:
      sizes["attn"] += size
  total = count_params(cfg, seq_len)
  seq_len = seq_len or cfg.max_seq_len
  routed_active = (sizes["routed"] * cfg.n_activated_experts // cfg.n_routed_experts
                   if cfg.is_moe_model else 0)
  ffn_flops = 6 * (sizes["ffn"] - sizes["routed"] + routed_active)
  attn_flops = 6 * sizes["attn"] + 12 * cfg.n_layers * cfg.d_model * seq_len
  head_flops = 6 * sizes["head"]
  flops = total.train_flops_per_token
  return Shares(sizes["vocab"] / total.total, sizes["ffn"] / total.total, sizes["attn"] / total.total,
                head_flops / flops, ffn_flops / flops, attn_flops / flops)
