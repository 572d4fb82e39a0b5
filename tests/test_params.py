"""Preset parameter counts against the paper (Table 1, Section 5-7), via the counter."""

import pytest

from experiments import count_params as cli
from moe.model.counts import count_params
from moe.model.presets import get_preset

# (total, activated) from the paper.
PAPER = {
    "deepseekmoe_16b": (16.4e9, 2.8e9),
    "deepseekmoe_145b": (144.6e9, 22.2e9),
    "deepseekmoe_2b": (2.0e9, 0.3e9),
}


@pytest.mark.parametrize("preset", ["deepseekmoe_16b", "deepseekmoe_145b", "deepseekmoe_2b"])
def test_deepseekmoe_presets_match_paper(preset):
  c = count_params(get_preset(preset))
  total, activated = PAPER[preset]
  assert abs(c.total / total - 1) < 0.02, c
  if preset == "deepseekmoe_2b":
    # The paper prints 0.3B (one decimal): within rounding, not 2% of a rounded number.
    assert round(c.activated / 1e9, 1) == 0.3, c
  else:
    assert abs(c.activated / activated - 1) < 0.02, c


def test_16b_matches_public_checkpoint_arithmetic():
  # Layer 0 dense (10944), 27 MoE layers of 2 shared + 64 routed experts of 1408, untied.
  d, v, f, e = 2048, 102400, 1408, 64
  attn = 4 * d * d
  norms = 2 * d
  moe_layer = attn + norms + 3 * d * f * (e + 2) + d * e
  dense_layer = attn + norms + 3 * d * 10944
  expected = 2 * v * d + d + dense_layer + 27 * moe_layer
  assert count_params(get_preset("deepseekmoe_16b")).total == expected


@pytest.mark.parametrize("preset, total, activated", [
    ("dense_0.2b", 0.2e9, 0.2e9), ("gshard_2b", 2.0e9, 0.3e9), ("switch_2b", 2.0e9, 0.2e9),
    ("hash_2b", 2.0e9, 0.2e9), ("dense_x16_2b", 1.9e9, 1.9e9)])
def test_baselines_match_table_1(preset, total, activated):
  c = count_params(get_preset(preset))
  assert round(c.total / 1e9, 1) == pytest.approx(total / 1e9, abs=0.11), c
  assert round(c.activated / 1e9, 1) == pytest.approx(activated / 1e9, abs=0.11), c


def test_tiny_presets_keep_the_expert_arithmetic():
  ds, gs = count_params(get_preset("tiny_deepseekmoe")), count_params(get_preset("tiny_gshard"))
  # Router widths differ (16 vs 4 experts), all else is equal.
  d, n_layers = 128, 4
  assert ds.total - gs.total == n_layers * d * (15 - 4)
  assert ds.activated - gs.activated == n_layers * d * (15 - 4)


def test_dense_flops_formula():
  cfg = get_preset("tiny_dense")
  c = count_params(cfg, seq_len=100)
  assert c.train_flops_per_token == 6 * (c.total - cfg.vocab_size * cfg.d_model) + 12 * 4 * 128 * 100


def test_cli_prints_counts(capsys):
  out = cli.report("deepseekmoe_16b")
  assert f"total_params={count_params(get_preset('deepseekmoe_16b')).total}" in out
  assert "activated_params=" in out and "train_flops_per_token=" in out
