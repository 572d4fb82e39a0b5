"""Model configuration: one frozen dataclass, validated on construction, plus presets.

Presets hold the paper's numbers (arXiv 2401.06066, Table 1 and Appendix A) and the
public DeepSeek-MoE 16B checkpoint's `config.json`. Gin selects a preset and overrides
fields through `model_config`:

    model_config.preset = 'deepseekmoe_2b'
    model_config.n_layers = 4
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin

ROUTERS = ("topk", "switch", "gshard", "hash")
"""topk: DeepSeekMoE softmax top-K' with raw-probability gates, dropless.
switch: top-1 with capacity and token dropping. gshard: top-2 with capacity, token
dropping and random second-expert routing. hash: fixed token-id hash to one expert."""

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
  router: str = "topk"
  n_routed_experts: int = 0
  n_shared_experts: int = 0
  n_activated_experts: int = 0  # K' = mK - K_s, routed experts per token
  expert_width: int = 0
  first_k_dense_replace: int = 0
  moe_layer_freq: int = 1
  norm_topk_prob: bool = False
  capacity_factor: float = 1.0  # switch / gshard only
  dispatch: str = "auto"  # dropless backend, a name in moe.backends.BACKENDS or "auto"
  # Expert parallelism (a mesh is active): rows per destination block of the all_to_all
  # buffers, as a multiple of the balanced share; 0 = dropless (static worst case).
  expert_capacity_factor: float = 0.0

  # Auxiliary losses, as weights on the training objective.
  expert_balance_alpha: float = 0.01
  device_balance_alpha: float = 0.0
  n_device_groups: int = 0  # D in the device-level balance loss; 0: the mesh's expert shards
  router_z_loss_alpha: float = 0.0

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


def _check_field_names(kwargs: dict[str, Any]) -> None:
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(kwargs) - names)
  if unknown:
    raise ValueError(f"ModelConfig has no field(s) {unknown}; valid fields: {sorted(names)}")


def _fail(field: str, value: Any, problem: str, fix: str) -> None:
  raise ValueError(f"ModelConfig.{field}={value!r}: {problem}. Fix: {fix}.")


def _validate(c: ModelConfig) -> None:
  for field in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "dense_ffn_width",
                "moe_layer_freq"):
    if getattr(c, field) <= 0:
      _fail(field, getattr(c, field), "must be positive", "set it to an integer >= 1")
  for field in ("n_routed_experts", "n_shared_experts", "n_activated_experts", "expert_width",
                "first_k_dense_replace", "expert_balance_alpha", "device_balance_alpha",
                "router_z_loss_alpha", "n_device_groups", "expert_capacity_factor"):
    if getattr(c, field) < 0:
      _fail(field, getattr(c, field), "must not be negative", "set it to 0 or more")
  if c.init_std <= 0:
    _fail("init_std", c.init_std, "must be positive", "use e.g. 0.006 as in the paper")
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
    _fail("router", c.router, "unknown router name", f"use one of {ROUTERS}")
  for field in ("dtype", "param_dtype"):
    if getattr(c, field) not in DTYPES:
      _fail(field, getattr(c, field), "unknown dtype", f"use one of {DTYPES}")
  if c.first_k_dense_replace > c.n_layers:
    _fail("first_k_dense_replace", c.first_k_dense_replace, f"exceeds n_layers={c.n_layers}",
          "use at most n_layers")
  _validate_dispatch(c)
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
  if c.router in ("switch", "hash") and c.n_activated_experts != 1:
    _fail("n_activated_experts", c.n_activated_experts, f"router {c.router!r} routes to exactly one expert",
          "set n_activated_experts = 1")
  if c.router == "gshard" and c.n_activated_experts != 2:
    _fail("n_activated_experts", c.n_activated_experts, "router 'gshard' is top-2",
          "set n_activated_experts = 2")
  if c.router in ("switch", "gshard") and c.capacity_factor <= 0:
    _fail("capacity_factor", c.capacity_factor, "must be positive", "use e.g. 1.0 or 1.25")
  if c.n_device_groups and c.n_routed_experts % c.n_device_groups:
    _fail("n_device_groups", c.n_device_groups,
          f"does not divide n_routed_experts={c.n_routed_experts}",
          "pick a divisor of the routed expert count")
  if c.n_moe_layers == 0:
    _fail("first_k_dense_replace", c.first_k_dense_replace, "leaves no MoE layer in a MoE model",
          "lower first_k_dense_replace or moe_layer_freq")


def _validate_dispatch(c: ModelConfig) -> None:
  from moe import backends  # local: keeps `import moe.config` free of kernel imports

  if c.dispatch not in backends.names():
    _fail("dispatch", c.dispatch, "unknown dropless dispatch backend", f"use one of {backends.names()}")


# ---------------------------------------------------------------------------------------
# Presets. The standard FFN width of the paper's models is 2.75 * d_model (16B: 4 x 1408 =
# 5632 = 2.75 x 2048), fine-grained experts are a quarter (2B, 16B) or an eighth (145B).

_2B = dict(vocab_size=8192, d_model=1280, n_layers=9, n_heads=10, max_seq_len=2048,
           dense_ffn_width=3520, expert_balance_alpha=0.01)
_LARGE = dict(vocab_size=102400, max_seq_len=4096)
_TINY = dict(vocab_size=8192, d_model=128, n_layers=4, n_heads=4, max_seq_len=256,
             dense_ffn_width=384)

def _cpu_scale() -> list[ModelConfig]:
  """The 2B comparisons' arithmetic at CPU scale: d_model 128, 4 layers, standard FFN width
  F = 2.75 d = 352, 16 F of expert width per MoE layer; 'cpu_' + the 2B preset's name."""
  f = 352
  base = dict(vocab_size=8192, d_model=128, n_layers=4, n_heads=4, max_seq_len=256,
              dense_ffn_width=f, expert_balance_alpha=0.01)
  moe = lambda name, router, n, shared, k, width: ModelConfig(
      name=name, **base, router=router, n_routed_experts=n, n_shared_experts=shared,
      n_activated_experts=k, expert_width=width)
  return [
      ModelConfig(name="cpu_dense", **base),
      ModelConfig(name="cpu_dense_x16", **{**base, "dense_ffn_width": 16 * f}),
      moe("cpu_hash", "hash", 16, 0, 1, f),
      moe("cpu_switch", "switch", 16, 0, 1, f),
      moe("cpu_gshard", "gshard", 16, 0, 2, f),
      moe("cpu_gshard_x1.5", "gshard", 16, 0, 2, f * 3 // 2),
      moe("cpu_ladder_shared", "topk", 15, 1, 1, f),
      moe("cpu_ladder_fine", "topk", 31, 1, 3, f // 2),
      moe("cpu_deepseekmoe", "topk", 63, 1, 7, f // 4),
  ]


PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        ModelConfig(name="deepseekmoe_2b", **_2B, n_routed_experts=63, n_shared_experts=1,
                    n_activated_experts=7, expert_width=880),
        ModelConfig(name="deepseekmoe_16b", **_LARGE, d_model=2048, n_layers=28, n_heads=16,
                    dense_ffn_width=10944, n_routed_experts=64, n_shared_experts=2,
                    n_activated_experts=6, expert_width=1408, first_k_dense_replace=1,
                    expert_balance_alpha=0.001),
        # Layer 0's dense width is not in the paper; 22528 = 2 x the standard 11264 follows
        # 16B's ratio and lands the totals on the paper's 144.6B / 22.2B.
        ModelConfig(name="deepseekmoe_145b", **_LARGE, d_model=4096, n_layers=62, n_heads=32,
                    dense_ffn_width=22528, n_routed_experts=128, n_shared_experts=4,
                    n_activated_experts=12, expert_width=1408, first_k_dense_replace=1,
                    expert_balance_alpha=0.003, device_balance_alpha=0.05, n_device_groups=4),
        ModelConfig(name="dense_0.2b", **_2B),
        ModelConfig(name="hash_2b", **_2B, router="hash", n_routed_experts=16,
                    n_activated_experts=1, expert_width=3520),
        ModelConfig(name="switch_2b", **_2B, router="switch", n_routed_experts=16,
                    n_activated_experts=1, expert_width=3520),
        ModelConfig(name="gshard_2b", **_2B, router="gshard", n_routed_experts=16,
                    n_activated_experts=2, expert_width=3520),
        ModelConfig(name="gshard_x1.5_2b", **_2B, router="gshard", n_routed_experts=16,
                    n_activated_experts=2, expert_width=5280),
        ModelConfig(name="dense_x16_2b", **{**_2B, "dense_ffn_width": 16 * 3520}),
        # The ablation ladder (paper Figure 3), equal total and activated parameters:
        # gshard_2b (0 + 2 of 16) -> shared (1 + 1 of 15) -> fine (1 + 3 of 31) -> finer =
        # deepseekmoe_2b (1 + 7 of 63).
        ModelConfig(name="ladder_shared_2b", **_2B, n_routed_experts=15, n_shared_experts=1,
                    n_activated_experts=1, expert_width=3520),
        ModelConfig(name="ladder_fine_2b", **_2B, n_routed_experts=31, n_shared_experts=1,
                    n_activated_experts=3, expert_width=1760),
        *_cpu_scale(),
        # CPU scale, same expert arithmetic: F = 384; DeepSeekMoE holds 16 x F/4 = 4F of
        # expert width and activates 8 x F/4 = 2F, as GShard's top-2 of 4 experts of width F.
        ModelConfig(name="tiny_deepseekmoe", **_TINY, n_routed_experts=15, n_shared_experts=1,
                    n_activated_experts=7, expert_width=96),
        ModelConfig(name="tiny_gshard", **_TINY, router="gshard", n_routed_experts=4,
                    n_activated_experts=2, expert_width=384),
        ModelConfig(name="tiny_switch", **_TINY, router="switch", n_routed_experts=4,
                    n_activated_experts=1, expert_width=384),
        ModelConfig(name="tiny_hash", **_TINY, router="hash", n_routed_experts=4,
                    n_activated_experts=1, expert_width=384),
        ModelConfig(name="tiny_dense", **_TINY),
        ModelConfig(name="tiny_gshard_x1.5", **_TINY, router="gshard", n_routed_experts=4,
                    n_activated_experts=2, expert_width=576),
        ModelConfig(name="tiny_dense_x4", **{**_TINY, "dense_ffn_width": 4 * 384}),
    ]
}


def get_preset(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}")
  return PRESETS[name]


@gin.configurable
def model_config(preset: str = "tiny_deepseekmoe", **overrides) -> ModelConfig:
  """A preset with field overrides; the gin entry point (`model_config.FIELD = VALUE`)."""
  base = get_preset(preset)
  if overrides and "name" not in overrides:
    overrides["name"] = base.name + "+" + ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
  return base.replace(**overrides)
