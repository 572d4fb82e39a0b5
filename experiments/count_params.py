"""Print a model's total and activated parameters and FLOPs per token.

  python -m experiments.count_params --preset=deepseekmoe_16b
  python -m experiments.count_params --gin_file=experiments/configs/cpu/deepseekmoe.gin
"""

from experiments import common_flags, errors, gin_flags
from moe.model.config import ModelConfig
from moe.model.counts import count_params, shares
from moe.model.presets import get_preset, model_config

_PRESET = common_flags.preset()
_SEQ_LEN = common_flags.seq_len()  # for attention FLOPs


def report(cfg: ModelConfig | str, seq_len: int | None = None) -> str:
  """`cfg`: a config or a preset's name."""
  cfg = get_preset(cfg) if isinstance(cfg, str) else cfg
  c = count_params(cfg, seq_len)
  sh = shares(cfg, seq_len)
  return "\n".join([
      f"preset={cfg.name}",
      f"total_params={c.total}",
      f"activated_params={c.activated}",
      f"train_flops_per_token={c.train_flops_per_token:.4g}",
      f"forward_flops_per_token={c.forward_flops_per_token:.4g}",
      f"seq_len={seq_len or cfg.max_seq_len}",
      f"params: vocabulary {sh.vocab_params:.1%}, FFN {sh.ffn_params:.1%}, attention {sh.attention_params:.1%}",
      f"train FLOPs: LM head {sh.head_flops:.1%}, FFN {sh.ffn_flops:.1%}, attention {sh.attention_flops:.1%}",
  ])


def main(argv):
  gin_flags.parse(argv)
  print(report(model_config(), _SEQ_LEN.value))


if __name__ == "__main__":
  errors.run(main, flags_parser=gin_flags.flags_parser)
