"""The public DeepSeek-MoE checkpoint's `config.json` <-> ModelConfig, both ways; what one
side cannot represent is refused by name (CheckpointFormatError)."""

from __future__ import annotations

from typing import Any, Mapping

from moe.model.config import ModelConfig

ARCHITECTURE, MODEL_TYPE = "DeepseekForCausalLM", "deepseek"


class CheckpointFormatError(ValueError):
  """A checkpoint directory this model cannot read or a model the format cannot hold; the
  message names the file, tensor, field or shape."""


def _refuse(field: str, value: Any, why: str) -> None:
  raise CheckpointFormatError(f"config.json: {field}={value!r}: {why}")


# config.json fields of other DeepSeek architectures (V2/V3) and their supported values.
_MUST_BE = {
    "model_type": ((None, MODEL_TYPE), "another architecture (DeepSeek-V2/V3 are 'deepseek_v2'/'deepseek_v3')"),
    "kv_lora_rank": ((None,), "multi-head latent attention (MLA, DeepSeek-V2/V3); this model has plain MHA"),
    "q_lora_rank": ((None,), "multi-head latent attention (MLA, DeepSeek-V2/V3); this model has plain MHA"),
    "scoring_func": ((None, "softmax"), "only softmax router scores are supported"),
    "topk_method": ((None, "greedy"), "device- or group-limited routing; only plain top-k ('greedy') is supported"),
    "n_group": ((None, 1), "group-limited routing is not supported"),
    "topk_group": ((None, 1), "group-limited routing is not supported"),
    "routed_scaling_factor": ((None, 1.0), "scaled routed-expert gates are not supported"),
    "hidden_act": ((None, "silu"), "the FFNs are SwiGLU (silu)"),
    "attention_bias": ((None, False), "the attention projections have no bias"),
    "mlp_bias": ((None, False), "the FFN projections have no bias"),
    "rope_scaling": ((None,), "rotary embeddings are unscaled"),
    "tie_word_embeddings": ((None, False), "this model has an untied lm_head"),
}


def config_from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
  """A ModelConfig from a DeepSeek-MoE `config.json` dict; `overrides` set further fields
  (dtype, remat, dispatch_backend, ...)."""
  for field, (allowed, why) in _MUST_BE.items():
    if hf.get(field) not in allowed:
      _refuse(field, hf[field], why)
  if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
    _refuse("num_key_value_heads", hf["num_key_value_heads"],
            "differs from num_attention_heads; DeepSeekMoE v1 uses plain multi-head attention")
  if hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
    _refuse("head_dim", hf["head_dim"], "must be hidden_size / num_attention_heads")
  rope = hf.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default":
    _refuse("rope_parameters.rope_type", rope["rope_type"], "rotary embeddings are unscaled")
  fields = dict(
      name=hf.get("_name_or_path", "hf_checkpoint") or "hf_checkpoint",
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
      n_heads=hf["num_attention_heads"], max_seq_len=hf.get("max_position_embeddings", 4096),
      rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
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
  try:
    return ModelConfig(**fields)
  except ValueError as e:  # e.g. an odd head_dim: name the file as well as the field
    raise CheckpointFormatError(f"config.json describes a model this code cannot build: {e}") from None


def config_to_hf(cfg: ModelConfig, dtype: str, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None = None) -> dict[str, Any]:
  """The `config.json` dict of a model (the fields of the public 16B checkpoint's); refuses
  what the format cannot represent. dtype: 'bfloat16' or 'float32' (the tensors')."""
  if cfg.router != "topk":
    raise CheckpointFormatError(
        f"ModelConfig.router={cfg.router!r}: the DeepSeek-MoE format has only softmax top-k "
        f"dropless routing ('topk'); {cfg.router!r} routes by token id (hash) or with "
        f"capacity and token dropping (switch, gshard), which transformers' model would not do")
  moe = cfg.is_moe_model
  return {
      "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.dense_ffn_width,
      "moe_intermediate_size": cfg.expert_width if moe else None,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_heads,
      "n_routed_experts": cfg.n_routed_experts if moe else None,
      "n_shared_experts": cfg.n_shared_experts if moe else None,
      "num_experts_per_tok": cfg.n_activated_experts if moe else None,
      "first_k_dense_replace": cfg.first_k_dense_replace, "moe_layer_freq": cfg.moe_layer_freq,
      "norm_topk_prob": cfg.norm_topk_prob, "scoring_func": "softmax",
      "aux_loss_alpha": cfg.expert_balance_alpha, "seq_aux": True,
      "hidden_act": "silu", "attention_bias": False,
      "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
      "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
      "tie_word_embeddings": False, "bos_token_id": bos_id, "eos_token_id": eos_id,
      "pad_token_id": pad_id, "torch_dtype": dtype, "use_cache": True,
  }
