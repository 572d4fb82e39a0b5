"""A ModelConfig from the public DeepSeek-MoE checkpoint's `config.json`; what this model
cannot represent is refused by name."""

from __future__ import annotations

from typing import Any, Mapping

from moe.model.config import ModelConfig


def config_from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
  """A ModelConfig from a DeepSeek-MoE `config.json` dict."""
  if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
    raise ValueError("config.json: num_key_value_heads differs from num_attention_heads; "
                     "DeepSeekMoE v1 uses plain multi-head attention")
  if hf.get("scoring_func", "softmax") != "softmax":
    raise ValueError(f"config.json: scoring_func={hf['scoring_func']!r}; only 'softmax' is supported")
  if hf.get("tie_word_embeddings", False):
    raise ValueError("config.json: tie_word_embeddings=true; this model has an untied lm_head")
  fields = dict(
      name=hf.get("_name_or_path", "hf_checkpoint") or "hf_checkpoint",
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
      n_heads=hf["num_attention_heads"], max_seq_len=hf.get("max_position_embeddings", 4096),
      rope_theta=float(hf.get("rope_theta", hf.get("rope_parameters", {}).get("rope_theta", 10000.0))),
      norm_eps=hf.get("rms_norm_eps", 1e-6),
      dense_ffn_width=hf["intermediate_size"], router="topk",
      n_routed_experts=hf.get("n_routed_experts") or 0, n_shared_experts=hf.get("n_shared_experts") or 0,
      n_activated_experts=hf.get("num_experts_per_tok") or 0,
      expert_width=hf.get("moe_intermediate_size") or 0,
      first_k_dense_replace=hf.get("first_k_dense_replace", 0), moe_layer_freq=hf.get("moe_layer_freq", 1),
      norm_topk_prob=hf.get("norm_topk_prob", False),
      expert_balance_alpha=hf.get("aux_loss_alpha", 0.001),
  )
  if not fields["n_routed_experts"]:
    fields.update(n_shared_experts=0, n_activated_experts=0, expert_width=0)
  fields.update(overrides)
  return ModelConfig(**fields)
