"""Print a preset's total and activated parameters and FLOPs per token.

  python -m experiments.count_params --preset=deepseekmoe_16b
"""

from absl import app, flags

from experiments import errors
from moe.model.counts import count_params, shares
from moe.model.presets import PRESETS, get_preset

_PRESET = flags.DEFINE_string("preset", "tiny_deepseekmoe", f"one of {sorted(PRESETS)}")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "context length for attention FLOPs "
                                "(default: the preset's max_seq_len)")


def report(preset: str, seq_len: int | None = None) -> str:
  cfg = get_preset(preset)
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
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(report(_PRESET.value, _SEQ_LEN.value))


if __name__ == "__main__":
  errors.run(main)
