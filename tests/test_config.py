import dataclasses

import gin
import pytest

from moe.model.config import ModelConfig
from moe.model.presets import PRESETS, get_preset, model_config

TINY = get_preset("tiny_deepseekmoe")


@pytest.mark.parametrize("changes, field", [
    (dict(n_activated_experts=16), "n_activated_experts"),    # top-k > routed experts
    (dict(n_activated_experts=0), "n_activated_experts"),
    (dict(n_heads=5), "n_heads"),                              # does not divide d_model
    (dict(n_heads=128), "n_heads"),                            # odd head_dim (1)
    (dict(n_device_groups=4), "n_device_groups"),              # 4 does not divide 15
    (dict(d_model=-8), "d_model"),
    (dict(expert_width=-1), "expert_width"),
    (dict(n_shared_experts=-1), "n_shared_experts"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(router="expert_choice"), "router"),
    (dict(dispatch_backend="magic"), "dispatch_backend"),
    (dict(dtype="float16"), "dtype"),
    (dict(expert_balance_alpha=-0.1), "expert_balance_alpha"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace"),
    (dict(first_k_dense_replace=4), "first_k_dense_replace"),  # no MoE layer left
    (dict(init_std=0.0), "init_std"),
    (dict(expert_width=0), "expert_width"),
])
def test_bad_field_is_named(changes, field):
  with pytest.raises(ValueError, match=rf"ModelConfig\.{field}=.*Fix: "):
    TINY.replace(**changes)


def test_router_arity_is_checked():
  with pytest.raises(ValueError, match=r"n_activated_experts=.*'switch' routes each token to exactly 1 expert"):
    get_preset("tiny_switch").replace(n_activated_experts=2)
  with pytest.raises(ValueError, match=r"'gshard' routes each token to exactly 2 expert.*top-2"):
    get_preset("tiny_gshard").replace(n_activated_experts=1)


def test_dense_model_rejects_expert_fields():
  with pytest.raises(ValueError, match="n_routed_experts"):
    get_preset("tiny_dense").replace(n_shared_experts=2)


def test_unknown_field_and_preset():
  with pytest.raises(ValueError, match="no field.*'n_expert'"):
    TINY.replace(n_expert=3)
  with pytest.raises(ValueError, match="no field.*'dispatch'.*dispatch is now dispatch_backend"):
    model_config(preset="tiny_deepseekmoe", dispatch="fused")
  with pytest.raises(ValueError, match="unknown preset 'deepseekmoe_7b'"):
    get_preset("deepseekmoe_7b")


def test_config_is_frozen_and_presets_valid():
  with pytest.raises(dataclasses.FrozenInstanceError):
    TINY.d_model = 3
  for name, cfg in PRESETS.items():
    assert cfg.name == name
    assert isinstance(cfg, ModelConfig)


def test_layer_kinds_follow_checkpoint_rule():
  c = get_preset("deepseekmoe_16b")
  assert c.layer_kinds == ("dense",) + ("moe",) * 27
  c = TINY.replace(n_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
  assert c.layer_kinds == ("dense", "dense", "moe", "dense", "moe", "dense")


def test_gin_selects_preset_and_overrides():
  gin.clear_config()
  try:
    gin.parse_config(["model_config.preset = 'tiny_gshard'", "model_config.n_layers = 2"])
    c = model_config()
    assert c.router == "gshard" and c.n_layers == 2 and c.d_model == 128
    gin.parse_config(["model_config.n_heads = 3"])
    with pytest.raises(ValueError, match=r"ModelConfig\.n_heads=3"):
      model_config()
  finally:
    gin.clear_config()
