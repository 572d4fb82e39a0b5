"""The public DeepSeek-MoE checkpoint's `config.json` <-> ModelConfig, both ways; what one
side cannot represent is refused by name (CheckpointFormatError)."""

from __future__ import annotations

import math
from typing import Any, Mapping

from moe.model.config import ModelConfig

ARCHITECTURE, MODEL_TYPE = "DeepseekForCausalLM", "deepseek"


class CheckpointFormatError(ValueError):
  """A checkpoint directory this model cannot read or a model the format cannot hold; the
  message names the file, tensor, field or shape."""


def is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)  # JSON true is not a size


def short_repr(x: Any, limit: int = 120) -> str:
  """repr(x), cut: a hostile value may be megabytes long, its error message need not be."""
  r = repr(x)
  return r if len(r) <= limit else r[:limit] + "..."


def _refuse(field: str, value: Any, why: str) -> None:
  raise CheckpointFormatError(f"config.json: {field}={short_repr(value, 80)}: {why}")


# Bounds far above any released model (DeepSeek-V3: 61 layers x 256 experts) that keep a
# corrupt value from making the per-layer, per-expert bookkeeping run for minutes.
MAX_SIZE, MAX_LAYERS, MAX_EXPERTS, MAX_EXPERT_TENSORS = 2**31 - 1, 2**16, 2**16, 2**20
_MISSING = object()


def _int(hf: Mapping[str, Any], field: str, default: Any = _MISSING, low: int = 1,
         high: int = MAX_SIZE) -> int:
  """hf[field] as an int in [low, high] (JSON true/false and 2.0 are refused: they are
  typos, not sizes); null or absent: `default`, or refused if there is none."""
  value = hf.get(field)
  if value is None:
    if default is _MISSING:
      raise CheckpointFormatError(f"config.json: {field} is missing; a DeepSeek-MoE config.json "
                                  f"always sets it")
    return default
  if not is_int(value):
    _refuse(field, value, f"must be an integer, not {type(value).__name__}")
  if not low <= value <= high:
    _refuse(field, value, f"must be between {low} and {high}")
  return value


def _float(hf: Mapping[str, Any], field: str, default: float, positive: bool = True) -> float:
  """hf[field] as a finite float, > 0 (or >= 0 unless `positive`); null or absent: default."""
  value = hf.get(field)
  if value is None:
    return default
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    _refuse(field, value, f"must be a number, not {type(value).__name__}")
  if not math.isfinite(value) or value < 0 or (positive and value == 0):
    _refuse(field, value, "must be a finite number " + ("> 0" if positive else ">= 0"))
  return float(value)


def _same(value: Any, allowed: Any) -> bool:
  """value == allowed, except that JSON true/false never stands for 1/0 or the reverse."""
  return value == allowed and isinstance(value, bool) == isinstance(allowed, bool)


# config.json fields of other DeepSeek architectures (V2/V3) and their supported values.
_MUST_BE = {
    "hidden_act": ((None, "silu"), "the FFNs are SwiGLU (silu)"),
    "attention_bias": ((None, False), "the attention projections have no bias"),
    "mlp_bias": ((None, False), "the FFN projections have no bias"),
    "rope_scaling": ((None,), "rotary embeddings are unscaled"),
    "tie_word_embeddings": ((None, False), "this model has an untied lm_head"),
}
_MLA = ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
# (topk_method, scoring_func) -> router: the DeepSeek family's routers this code has.
_ROUTERS = {("greedy", "softmax"): "topk", ("group_limited_greedy", "softmax"): "group_limited",
            ("noaux_tc", "sigmoid"): "sigmoid_bias"}


def routing_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
  """The ModelConfig routing fields of a DeepSeek (v1, V2 or V3) `config.json`: router,
  groups and the gates' scaling factor; a routing this code lacks is refused by name."""
  method, scoring = hf.get("topk_method") or "greedy", hf.get("scoring_func") or "softmax"
  router = _ROUTERS.get((method, scoring)) if isinstance(method, str) and isinstance(scoring, str) else None
  if router is None:
    _refuse("topk_method", method, f"with scoring_func={short_repr(scoring, 40)}: the routers here "
            f"are {', '.join(f'{m}+{s}' for m, s in _ROUTERS)}")
  out = {"router": router, "routed_scaling_factor": _float(hf, "routed_scaling_factor", 1.0)}
  if router != "topk":  # V2's plain greedy ignores the group fields
    out.update(n_group=_int(hf, "n_group", 1, high=MAX_EXPERTS),
               topk_group=_int(hf, "topk_group", 1, high=MAX_EXPERTS))
  return out


def _refuse_mla(hf: Mapping[str, Any]) -> None:
  """DeepSeek-V2/V3 files: name what is missing (their attention) and what would carry over."""
  mla = [f"{f}={short_repr(hf[f], 20)}" for f in _MLA if hf.get(f) is not None]
  if not mla and hf.get("model_type") in (None, MODEL_TYPE):
    return
  try:
    routing = ", ".join(f"{k}={v!r}" for k, v in routing_fields(hf).items())
  except CheckpointFormatError as e:
    routing = f"not representable either ({e})"
  raise CheckpointFormatError(
      f"config.json: model_type={short_repr(hf.get('model_type'), 40)}"
      f"{' (' + ', '.join(mla) + ')' if mla else ''}: multi-head latent attention (MLA, "
      f"DeepSeek-V2/V3) is not implemented here (this model has plain multi-head attention), so "
      f"its weights cannot be imported. Its routing is representable as ModelConfig({routing}), "
      f"to train on this code's attention.")


def config_from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
  """A ModelConfig from a DeepSeek-MoE `config.json` dict; `overrides` set further fields
  (dtype, remat, dispatch_backend, ...). Every field read is checked for type and range
  first, so a hand-edited or corrupt file is refused by field name, never half-read."""
  if not isinstance(hf, Mapping):
    raise CheckpointFormatError(f"config.json: holds a JSON {type(hf).__name__}, not an object")
  _refuse_mla(hf)
  routing = routing_fields(hf)
  if routing["router"] == "sigmoid_bias":
    _refuse("topk_method", hf.get("topk_method"), "the DeepSeek-MoE format holds no selection bias "
            "(e_score_correction_bias) to import; train router 'sigmoid_bias' from scratch")
  for field, (allowed, why) in _MUST_BE.items():
    if not any(_same(hf.get(field), a) for a in allowed):
      _refuse(field, hf[field], why)
  vocab, d_model, ffn = (_int(hf, f) for f in ("vocab_size", "hidden_size", "intermediate_size"))
  n_layers = _int(hf, "num_hidden_layers", high=MAX_LAYERS)
  n_heads = _int(hf, "num_attention_heads", high=d_model)
  if d_model % n_heads or (d_model // n_heads) % 2:
    _refuse("num_attention_heads", n_heads, f"must divide hidden_size={d_model} into an even head "
            f"dim (rotary embeddings split it in two)")
  if _int(hf, "num_key_value_heads", n_heads) != n_heads:
    _refuse("num_key_value_heads", hf["num_key_value_heads"],
            "differs from num_attention_heads; DeepSeekMoE v1 uses plain multi-head attention")
  if _int(hf, "head_dim", d_model // n_heads) != d_model // n_heads:
    _refuse("head_dim", hf["head_dim"], "must be hidden_size / num_attention_heads")
  rope = {} if hf.get("rope_parameters") is None else hf["rope_parameters"]
  if not isinstance(rope, Mapping):
    _refuse("rope_parameters", rope, "must be an object")
  if rope.get("rope_type", "default") != "default":
    _refuse("rope_parameters.rope_type", rope["rope_type"], "rotary embeddings are unscaled")
  theta = _float({"rope_parameters.rope_theta": rope.get("rope_theta")}, "rope_parameters.rope_theta", 10000.0)
  experts = _int(hf, "n_routed_experts", 0, low=0, high=MAX_EXPERTS)
  if n_layers * experts > MAX_EXPERT_TENSORS:
    _refuse("n_routed_experts", experts, f"x num_hidden_layers={n_layers} is over {MAX_EXPERT_TENSORS} experts")
  shared = _int(hf, "n_shared_experts", 0, low=0, high=MAX_EXPERTS)
  top_k = _int(hf, "num_experts_per_tok", 0, low=0, high=MAX_EXPERTS)
  width = _int(hf, "moe_intermediate_size", 0, low=0)
  if experts and not 1 <= top_k <= experts:
    _refuse("num_experts_per_tok", hf.get("num_experts_per_tok"),
            f"top-k must be between 1 and n_routed_experts={experts}")
  if experts and not width:
    _refuse("moe_intermediate_size", hf.get("moe_intermediate_size"), "must be set (> 0) in a MoE model")
  norm_topk = hf.get("norm_topk_prob")
  if norm_topk is not None and not isinstance(norm_topk, bool):
    _refuse("norm_topk_prob", norm_topk, "must be true or false")
  name = hf.get("_name_or_path")
  if name is not None and not isinstance(name, str):
    _refuse("_name_or_path", name, "must be a string")
  fields = dict(
      name=name or "hf_checkpoint", vocab_size=vocab, d_model=d_model, n_layers=n_layers,
      n_heads=n_heads, max_seq_len=_int(hf, "max_position_embeddings", 4096),
      rope_theta=_float(hf, "rope_theta", theta), norm_eps=_float(hf, "rms_norm_eps", 1e-6),
      dense_ffn_width=ffn, n_routed_experts=experts, n_shared_experts=shared,
      n_activated_experts=top_k, expert_width=width,
      first_k_dense_replace=_int(hf, "first_k_dense_replace", 0, low=0, high=n_layers),
      moe_layer_freq=_int(hf, "moe_layer_freq", 1, high=MAX_LAYERS), norm_topk_prob=bool(norm_topk),
      expert_balance_alpha=_float(hf, "aux_loss_alpha", 0.001, positive=False), **routing,
  )
  if not experts:  # a dense model: whatever the expert fields say, there are none
    fields.update(n_shared_experts=0, n_activated_experts=0, expert_width=0)
  fields.update(overrides)
  try:
    return ModelConfig(**fields)
  except ValueError as e:  # e.g. no MoE layer left: name the file as well as the field
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
  for field, plain in (("routed_scaling_factor", 1.0), ("n_null_experts", 0)):
    if getattr(cfg, field) != plain:
      raise CheckpointFormatError(f"ModelConfig.{field}={getattr(cfg, field)!r}: the DeepSeek-MoE "
                                  f"format has no such field (only {plain!r})")
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
