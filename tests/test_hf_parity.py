"""Parity with an independent implementation: transformers' DeepSeek-OCR-2 text model,
which has DeepSeekMoE v1's structure. Its weights are renamed to the public DeepSeek-MoE
checkpoint naming and imported with moe.hub.hf_weights (the
in-memory path; tests/test_hub.py goes through files)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.capabilities import import_or_skip

torch = import_or_skip("torch", "torch")
transformers = import_or_skip("transformers", "torch")

from moe.hub.hf_config import config_from_hf  # noqa: E402
from moe.hub.hf_weights import convert_public_checkpoint, load_public_checkpoint  # noqa: E402
from moe.model.decoder import Transformer  # noqa: E402
from tests import hub_fixtures as fx  # noqa: E402

HF = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
          n_shared_experts=2, num_experts_per_tok=3, rms_norm_eps=1e-6, max_position_embeddings=64,
          rope_theta=10000.0, first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False,
          tie_word_embeddings=False)


@pytest.fixture(scope="module")
def pair():
  ref = fx.reference_model(HF)
  lm_head = np.random.default_rng(0).normal(0, 0.3, (HF["vocab_size"], HF["hidden_size"]))
  tensors = fx.public_tensors(ref, lm_head)
  model = Transformer(config_from_hf(HF), nnx.Rngs(0))
  load_public_checkpoint(model, tensors)
  return ref, model, tensors


def run_both(ref, model, tokens):
  with torch.no_grad():
    h_ref = ref(torch.tensor(tokens)).last_hidden_state.numpy()
  h, _ = model.hidden_states(jnp.asarray(tokens))
  return np.asarray(h), h_ref


def test_final_hidden_states_and_logits_match(pair):
  ref, model, tensors = pair
  tokens = np.random.default_rng(1).integers(0, HF["vocab_size"], (2, 24))
  h, h_ref = run_both(ref, model, tokens)
  np.testing.assert_allclose(h, h_ref, rtol=1e-4, atol=1e-4)
  logits, _ = model(jnp.asarray(tokens))
  np.testing.assert_allclose(logits, h_ref @ tensors["lm_head.weight"].T, rtol=1e-4, atol=1e-4)
  # The weights are not degenerate: routing actually varies between tokens.
  assert np.std(h_ref) > 0.1


@pytest.mark.parametrize("breakage", ["rope_theta", "norm_eps", "norm_topk_prob", "top_k"])
def test_parity_detects_a_wrong_model(pair, breakage):
  ref, _, tensors = pair
  overrides = {"rope_theta": dict(rope_theta=500.0), "norm_eps": dict(norm_eps=1.0),
               "norm_topk_prob": dict(norm_topk_prob=True),
               "top_k": dict(n_activated_experts=2)}[breakage]
  model = Transformer(config_from_hf(HF, **overrides), nnx.Rngs(0))
  load_public_checkpoint(model, tensors)
  tokens = np.random.default_rng(1).integers(0, HF["vocab_size"], (2, 24))
  h, h_ref = run_both(ref, model, tokens)
  assert np.max(np.abs(h - h_ref)) > 1e-3


def test_converter_names_missing_and_unexpected_tensors(pair):
  _, model, tensors = pair
  broken = dict(tensors)
  del broken["model.layers.2.mlp.experts.5.up_proj.weight"]
  with pytest.raises(KeyError, match="layers.2.mlp.experts.5.up_proj"):
    convert_public_checkpoint(broken, model.cfg)
  extra = dict(tensors, **{"model.layers.9.mlp.gate.weight": np.zeros((8, 32))})
  with pytest.raises(ValueError, match="does not use"):
    convert_public_checkpoint(extra, model.cfg)
  bad = dict(tensors, **{"model.norm.weight": np.zeros(16, np.float32)})
  with pytest.raises(ValueError, match="final_norm/scale"):
    load_public_checkpoint(model, bad)
