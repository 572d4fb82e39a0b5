"""Model configuration: one frozen dataclass, validated on construction.

The paper's models are presets (moe.model.presets); a bad field raises a ValueError that
names the field and the fix.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moe.dispatch import registry
from moe.model.routers import ROUTERS

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only LM whose FFNs are dense or Mixture-of-Experts layers."""

  name: str = "custom"
  vocab_size: int = 8192
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  max_seq_len: int = 2048
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  # Width of every dense SwiGLU FFN: dense models and the first_k_dense_replace layers.
  dense_ffn_width: int = 384

  # Mixture of experts. n_routed_experts == 0 makes a dense model.
  router: str = "topk"  # a name in moe.model.routers.ROUTERS
  n_routed_experts: int = 0
  n_shared_experts: int = 0
  n_activated_experts: int = 0  # K' = mK - K_s, routed experts per token
  expert_width: int = 0
  first_k_dense_replace: int = 0
  moe_layer_freq: int = 1
  norm_topk_prob: bool = False
  # Multiplies the routed gates (DeepSeek-V2/V3's routed_scaling_factor); top-k routers only.
  routed_scaling_factor: float = 1.0
  # Group-limited routing (routers group_limited, sigmoid_bias): the routed experts form
  # n_group groups of consecutive experts and a token chooses only inside its topk_group best
  # groups. n_group 0: one group per expert-parallel shard of the active mesh (1 without a
  # mesh), so a token's choices reach at most topk_group shards.
  n_group: int = 1
  topk_group: int = 1
  # Zero-compute experts: routing targets past the N' real experts whose output is zero
  # (topk, topk_bias); a pair routed to one is neither moved nor multiplied.
  n_null_experts: int = 0
  capacity_factor: float = 1.0  # switch / gshard only; 0: no dropping (dropless path, same gates)
  dispatch_backend: str = "auto"  # how dropless routers' rows reach experts: moe.dispatch.registry
  attention_backend: str = "auto"  # moe.model.attention_backends: splash on TPU, cudnn on GPU, cpu_ffi on CPU
  ffn_backend: str = "auto"  # dense SwiGLU (and shared experts), moe.model.layers: cpu_ffi on CPU, else xla
  # Training loss over chunks of this many tokens (LM head + cross-entropy per chunk,
  # recomputed in the backward pass): no [B, S, vocab] f32 logits. 0: unchunked.
  loss_chunk_tokens: int = 0
  # Expert parallelism (a mesh is active). Dropless by default: all_to_all blocks of
  # expert_block_factor x the balanced share, overflow in extra rounds (moe.parallel.rounds).
  # expert_capacity_factor > 0 instead exchanges once with blocks of that multiple and
  # drops what does not fit.
  expert_capacity_factor: float = 0.0
  expert_block_factor: float = 1.25
  # How the rounds move rows: "all_to_all" (fixed blocks, every platform) or "ragged"
  # (lax.ragged_all_to_all: only filled rows; TPU/GPU only).
  expert_exchange: str = "all_to_all"

  # Auxiliary losses, as weights on the training objective.
  expert_balance_alpha: float = 0.01
  device_balance_alpha: float = 0.0
  n_device_groups: int = 0  # D in the device-level balance loss; 0: the mesh's expert shards
  router_z_loss_alpha: float = 0.0
  # DeepSeek-V3's complementary sequence-wise balance loss (the expert-level loss per
  # sequence of the batch, over scores normalised to sum 1, averaged over sequences).
  seq_balance_alpha: float = 0.0
  # router "topk_bias": each step moves every expert's selection bias by this much, up
  # for experts below the mean load and down for those above (DeepSeek-V3's u).
  bias_update_rate: float = 0.001

  # Numerics and compilation.
  dtype: str = "float32"  # activation / matmul dtype
  param_dtype: str = "float32"
  init_std: float = 0.006
  scan_layers: bool = True
  remat: bool = False

  def __post_init__(self):
    _validate(self)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def n_route_targets(self) -> int:
    """N' real routed experts plus the zero-compute ones: the router's output width."""
    return self.n_routed_experts + self.n_null_experts

  @property
  def is_moe_model(self) -> bool:
    return self.n_routed_experts > 0

  def is_moe_layer(self, layer: int) -> bool:
    """The public checkpoints' rule: MoE iff past the dense prefix and on the frequency."""
    return (self.is_moe_model and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0)

  @property
  def layer_kinds(self) -> tuple[str, ...]:
    return tuple("moe" if self.is_moe_layer(i) else "dense" for i in range(self.n_layers))

  @property
  def n_moe_layers(self) -> int:
    return sum(k == "moe" for k in self.layer_kinds)

  def replace(self, **changes) -> "ModelConfig":
    _check_field_names(changes)
    return dataclasses.replace(self, **changes)


# Fields renamed since runs and gin files were written: old name -> new name.
RENAMED_FIELDS = {"dispatch": "dispatch_backend"}


def _check_field_names(kwargs: dict[str, Any]) -> None:
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(kwargs) - names)
  renamed = [f"{k} is now {RENAMED_FIELDS[k]}" for k in unknown if k in RENAMED_FIELDS]
  if unknown:
    raise ValueError(f"ModelConfig has no field(s) {unknown}" + (f" ({'; '.join(renamed)})" if renamed else "")
                     + f"; valid fields: {sorted(names)}")


def _fail(field: str, value: Any, problem: str, fix: str) -> None:
  raise ValueError(f"ModelConfig.{field}={value!r}: {problem}. Fix: {fix}.")


def _validate(c: ModelConfig) -> None:
  for field in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "dense_ffn_width",
                "moe_layer_freq"):
    if getattr(c, field) <= 0:
      _fail(field, getattr(c, field), "must be positive", "set it to an integer >= 1")
  for field in ("n_routed_experts", "n_shared_experts", "n_activated_experts", "expert_width",
                "first_k_dense_replace", "expert_balance_alpha", "device_balance_alpha",
                "router_z_loss_alpha", "n_device_groups", "expert_capacity_factor", "capacity_factor",
                "bias_update_rate", "seq_balance_alpha", "n_group", "topk_group", "n_null_experts"):
    if getattr(c, field) < 0:
      _fail(field, getattr(c, field), "must not be negative", "set it to 0 or more")
  if c.init_std <= 0:
    _fail("init_std", c.init_std, "must be positive", "use e.g. 0.006 as in the paper")
  if c.ffn_backend not in ("auto", "xla", "cpu_ffi"):
    _fail("ffn_backend", c.ffn_backend, "unknown FFN backend", "use 'auto', 'xla' or 'cpu_ffi' (moe.model.layers)")
  if c.attention_backend not in ("auto", "reference", "cpu_ffi", "xla", "cudnn", "splash"):
    _fail("attention_backend", c.attention_backend, "unknown attention backend",
          "use 'auto', 'reference', 'cpu_ffi', 'xla', 'cudnn' or 'splash' (moe.model.attention_backends)")
  if c.loss_chunk_tokens < 0:
    _fail("loss_chunk_tokens", c.loss_chunk_tokens, "must not be negative", "0 (unchunked) or e.g. 1024")
  if c.expert_exchange not in ("all_to_all", "ragged"):
    _fail("expert_exchange", c.expert_exchange, "unknown exchange",
          "use 'all_to_all' (any platform) or 'ragged' (TPU/GPU)")
  if c.expert_block_factor <= 0:
    _fail("expert_block_factor", c.expert_block_factor, "must be positive",
          "use e.g. 1.25 (blocks of 1.25x the balanced share)")
  if c.rope_theta <= 0 or c.norm_eps <= 0:
    _fail("rope_theta" if c.rope_theta <= 0 else "norm_eps",
          c.rope_theta if c.rope_theta <= 0 else c.norm_eps, "must be positive",
          "use 10000.0 and 1e-6 as in the paper")
  if c.d_model % c.n_heads:
    _fail("n_heads", c.n_heads, f"does not divide d_model={c.d_model}",
          "pick n_heads so that d_model / n_heads is an integer")
  if c.head_dim % 2:
    _fail("n_heads", c.n_heads, f"gives odd head_dim={c.head_dim}, which rotary embeddings cannot split",
          "pick n_heads so that d_model / n_heads is even")
  if c.router not in ROUTERS:
    _fail("router", c.router, "unknown router name", f"use one of {sorted(ROUTERS)}")
  for field in ("dtype", "param_dtype"):
    if getattr(c, field) not in DTYPES:
      _fail(field, getattr(c, field), "unknown dtype", f"use one of {DTYPES}")
  if c.first_k_dense_replace > c.n_layers:
    _fail("first_k_dense_replace", c.first_k_dense_replace, f"exceeds n_layers={c.n_layers}",
          "use at most n_layers")
  if c.dispatch_backend not in registry.NAMES:
    _fail("dispatch_backend", c.dispatch_backend, "unknown dropless dispatch backend",
          f"use one of {registry.NAMES}")
  if not c.is_moe_model:
    if c.n_shared_experts or c.n_activated_experts:
      _fail("n_routed_experts", 0, "is 0 (a dense model) but shared/activated experts are set",
            "set n_routed_experts > 0, or n_shared_experts = n_activated_experts = 0")
    return
  if c.expert_width <= 0:
    _fail("expert_width", c.expert_width, "must be positive for a MoE model",
          "set it, e.g. dense_ffn_width // m for m-way fine-grained segmentation")
  if not 1 <= c.n_activated_experts <= c.n_routed_experts:
    _fail("n_activated_experts", c.n_activated_experts,
          f"top-k must be between 1 and n_routed_experts={c.n_routed_experts}",
          "lower n_activated_experts or add routed experts")
  spec = ROUTERS[c.router]
  if spec.fixed_k and c.n_activated_experts != spec.fixed_k:
    _fail("n_activated_experts", c.n_activated_experts,
          f"router {c.router!r} routes each token to exactly {spec.fixed_k} expert(s) (top-{spec.fixed_k})",
          f"set n_activated_experts = {spec.fixed_k}")
  if c.n_device_groups and c.n_routed_experts % c.n_device_groups:
    _fail("n_device_groups", c.n_device_groups,
          f"does not divide n_routed_experts={c.n_routed_experts}",
          "pick a divisor of the routed expert count")
  if c.routed_scaling_factor <= 0:
    _fail("routed_scaling_factor", c.routed_scaling_factor, "must be positive",
          "use 1.0 (DeepSeekMoE), or e.g. 2.5 as DeepSeek-V3")
  if c.routed_scaling_factor != 1.0 and not spec.scaled:
    _fail("routed_scaling_factor", c.routed_scaling_factor,
          f"router {c.router!r} has fixed gates", "keep 1.0, or use a top-k router")
  if spec.grouped:
    if c.n_group and c.n_routed_experts % c.n_group:
      _fail("n_group", c.n_group, f"does not divide n_routed_experts={c.n_routed_experts}",
            "pick a divisor of the routed expert count (0: one group per expert shard)")
    if c.topk_group < 1 or (c.n_group and c.topk_group > c.n_group):
      _fail("topk_group", c.topk_group, f"must be between 1 and n_group={c.n_group}",
            "keep at most as many groups as there are")
    if c.n_group and c.n_activated_experts > c.topk_group * (c.n_routed_experts // c.n_group):
      _fail("n_activated_experts", c.n_activated_experts,
            f"exceeds the {c.topk_group} kept group(s) of {c.n_routed_experts // c.n_group} experts",
            "raise topk_group or lower n_activated_experts")
  elif (c.n_group, c.topk_group) != (1, 1):
    _fail("n_group", c.n_group, f"router {c.router!r} does not limit groups",
          "use router 'group_limited' or 'sigmoid_bias', or keep n_group = topk_group = 1")
  if c.n_null_experts and not spec.null_experts:
    _fail("n_null_experts", c.n_null_experts, f"router {c.router!r} cannot route to zero-compute experts",
          "use router 'topk' or 'topk_bias', or set n_null_experts = 0")
  if c.n_moe_layers == 0:
    _fail("first_k_dense_replace", c.first_k_dense_replace, "leaves no MoE layer in a MoE model",
          "lower first_k_dense_replace or moe_layer_freq")
