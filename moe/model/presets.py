"""Presets: the paper's models (arXiv 2401.06066, Table 1 and Appendix A), the public
DeepSeek-MoE 16B checkpoint's `config.json`, and CPU-scale models with the same expert
arithmetic. Gin selects a preset and overrides fields through `model_config`:

    model_config.preset = 'deepseekmoe_2b'
    model_config.n_layers = 4
"""

from __future__ import annotations

import gin

from moe.model.config import ModelConfig

# The standard FFN width of the paper's models is 2.75 * d_model (16B: 4 x 1408 =
# 5632 = 2.75 x 2048), fine-grained experts are a quarter (2B, 16B) or an eighth (145B).

_2B = dict(vocab_size=8192, d_model=1280, n_layers=9, n_heads=10, max_seq_len=2048,
           dense_ffn_width=3520, expert_balance_alpha=0.01)
# A 102400-word vocabulary: the loss runs in chunks of 512 positions per row (no
# [B, S, vocab] f32 logits: 1.6 GiB per 4096-token row).
_LARGE = dict(vocab_size=102400, max_seq_len=4096, loss_chunk_tokens=512)
# The CPU protocol's models run their 4 layers unrolled: the same parameters (stacked) and
# the same losses bit for bit, and on this 2-core CPU 6-10% more tokens/s than the layer
# scan, whose per-layer residual stacks cost zero-fills, dynamic slices and copies
# (docs/bench_train.md). The tiny presets keep the scan: the test suite compiles dozens of
# them, and unrolled compiles took it from 16 to 19.7 minutes.
_UNROLLED = dict(scan_layers=False)
_TINY = dict(vocab_size=8192, d_model=128, n_layers=4, n_heads=4, max_seq_len=256,
             dense_ffn_width=384)


def _cpu_scale() -> list[ModelConfig]:
  """The 2B comparisons' arithmetic at CPU scale: d_model 128, 4 layers, standard FFN width
  F = 2.75 d = 352, 16 F of expert width per MoE layer; 'cpu_' + the 2B preset's name.

  A 512-piece vocabulary keeps the FFN dominant as in the paper (dense: embedding + head
  14% of parameters, FFN 58%; paper 2B dense: 10%, 60%). init_std is the paper's 0.006
  scaled by sqrt(1280 / 128), for every model: router logits (and every projection) start
  at the paper's scale, not 3x flatter."""
  f = 352
  base = dict(vocab_size=512, d_model=128, n_layers=4, n_heads=4, max_seq_len=256,
              dense_ffn_width=f, expert_balance_alpha=0.01, init_std=0.019, **_UNROLLED)
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
        # Calibration targets of plan's speed estimates (docs/plan.md), shaped like runs
        # MaxText published: Mixtral 8x7B (its attention is grouped-query, 8 KV heads; full
        # multi-head here), and its fine-grained variant of MaxText issue #1256.
        ModelConfig(name="mixtral_8x7b_shaped", vocab_size=32000, max_seq_len=4096, d_model=4096,
                    n_layers=32, n_heads=32, dense_ffn_width=14336, n_routed_experts=8,
                    n_activated_experts=2, expert_width=14336, norm_topk_prob=True),
        ModelConfig(name="mixtral_56e_shaped", vocab_size=32000, max_seq_len=4096, d_model=4096,
                    n_layers=32, n_heads=32, dense_ffn_width=14336, n_routed_experts=56,
                    n_activated_experts=14, expert_width=2048, norm_topk_prob=True),
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
