"""The paper's analyses: interventions on routing, token categories, specialization."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data.code_categories import CATEGORIES, char_categories
from moe import analysis, trainer
from moe.moe_layer import Intervention, Route, intervene, rerouted
from moe.model import Transformer
from tests.data_fixtures import small_data_config, small_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus):
  """A short run of a small DeepSeekMoE (15 routed experts, 1 shared, top-7) on the corpus."""
  workdir = tmp_path_factory.mktemp("analysis_run")
  trainer.train_and_evaluate(
      str(workdir), small_model(), small_data_config(small_corpus, eval_batches=1),
      trainer.TrainConfig(steps=6, warmup_steps=1, log_every=3, eval_every=6, checkpoint_every=6,
                          async_checkpoints=False))
  return str(workdir)


def test_rerouting_skips_the_masked_experts_and_keeps_their_probabilities():
  cfg = small_model()
  scores = jnp.array([[0.5, 0.2, 0.1, 0.15, 0.05], [0.05, 0.1, 0.6, 0.05, 0.2]])
  route = Route(jnp.zeros((2, 2)), jnp.zeros((2, 2), jnp.int32), scores, jnp.log(scores))
  r = rerouted(cfg, route, Intervention(mask_top=1))
  np.testing.assert_array_equal(r.expert_idx, [[1, 3], [4, 1]])
  np.testing.assert_allclose(r.gates, [[0.2, 0.15], [0.2, 0.1]])
  r = rerouted(cfg, route, Intervention(mask_top=2, n_activated=3))
  np.testing.assert_array_equal(r.expert_idx, [[3, 2, 4], [1, 0, 3]])


def forward_under(cfg):
  """iv -> (logits, aux) of a fresh model of cfg on fixed tokens, traced under iv."""
  graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(0)))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)

  def run(iv):
    @jax.jit  # a new function per call: the intervention is read when tracing
    def f(state, tokens):
      with intervene(iv):
        return nnx.merge(graphdef, state)(tokens)
    return f(state, tokens)

  return run


def test_interventions_change_the_model_only_when_asked():
  cfg = small_model(n_layers=2)
  logits = forward_under(cfg)

  base, _ = logits(Intervention())
  same, aux = logits(Intervention(n_activated=cfg.n_activated_experts, capture=True))
  np.testing.assert_allclose(same, base, rtol=1e-6, atol=1e-6)
  assert aux["layers"]["expert_idx"].shape == (cfg.n_moe_layers, 32, cfg.n_activated_experts)
  for iv in (Intervention(mask_top=1), Intervention(drop_shared=True), Intervention(n_activated=2)):
    assert float(jnp.max(jnp.abs(logits(iv)[0] - base))) > 1e-4, iv


def test_char_categories_of_python_source():
  src = ('"""Module doc."""\nimport os  # note\ndef f(x):\n    """Doc."""\n'
         '    y = x + 1.5\n    return "s" if y else None\n')
  cats = char_categories(src)
  want = {"Module": "docstring", "import": "keyword", "os": "identifier", "note": "comment",
          "Doc.": "docstring", "y =": "identifier", "1.5": "number", '"s"': "string",
          "None": "keyword", "+": "operator"}
  for text, cat in want.items():
    assert CATEGORIES[cats[src.index(text)]] == cat, text
  assert char_categories("def (:\n").shape == (7,)  # a syntax error is not fatal


def test_mutual_information():
  assert analysis.mutual_information(np.array([[5, 5], [5, 5]])) == pytest.approx(0.0)
  assert analysis.mutual_information(np.array([[7, 0], [0, 7]])) == pytest.approx(1.0)


def test_analyses_of_a_trained_run(trained, tmp_path):
  run = trainer.restore_run(trained)
  cfg = run.model_cfg
  data_batches = trainer.make_datasets(run.data_cfg, cfg.vocab_size).eval_batches
  evaluated = trainer.evaluate_checkpoint(trained)
  red = analysis.disable_top_experts(run, data_batches, fractions=(0, 2 / 16))
  assert red[0][2] == pytest.approx(evaluated["eval_loss"], rel=1e-5)  # p=0 is the plain eval
  # 6 steps leave experts nearly alike, so the effects are small, but they must be there.
  assert red[1][1] == 2 and abs(red[1][2] - red[0][2]) > 1e-6
  shared = analysis.without_shared_experts(run, data_batches)
  assert shared["loss"] == pytest.approx(red[0][2], rel=1e-5)
  assert abs(shared["loss_without_shared"] - shared["loss"]) > 1e-6
  ks = analysis.vary_activated(run, data_batches, ks=[1, cfg.n_activated_experts])
  assert ks[1][1] == pytest.approx(red[0][2], rel=1e-5)

  spec = analysis.specialization(run, max_tokens=500, batch_size=4)
  assert spec.tokens == 500
  per_layer = spec.counts.sum(axis=(1, 2))
  np.testing.assert_array_equal(per_layer, 500 * cfg.n_activated_experts)
  assert np.all(spec.mutual_info >= 0) and np.all(spec.shuffled_info >= 0)


def test_analyze_writes_tables_and_plots(trained, tmp_path):
  out = tmp_path / "out"
  results = analysis.analyze({"run": trained}, str(out), analyses=("redundancy", "load", "categories"),
                             max_tokens=300, log=lambda *_: None)
  assert set(results["run"]) >= {"loss", "redundancy", "load", "categories"}
  assert "topk" not in results["run"]
  for png in ("load_run.png", "categories_run.png", "redundancy.png"):
    assert os.path.getsize(out / png) > 1000, png
  text = analysis.report(results)
  assert "p=0.0625 (1 off)" in text and "I(token category; chosen expert)" in text
  json.dumps(results)  # JSON-able
  with pytest.raises(ValueError, match="unknown analyses"):
    analysis.analyze({"run": trained}, str(out), analyses=("nope",))


def test_capacity_intervention_stops_token_dropping():
  from moe.config import get_preset
  cfg = get_preset("tiny_gshard").replace(vocab_size=64, d_model=32, n_layers=2, dense_ffn_width=48,
                                          expert_width=48, capacity_factor=0.5)
  run = forward_under(cfg)
  dropped_logits, dropped = run(Intervention())
  full_logits, full = run(Intervention(capacity_factor=float(cfg.n_routed_experts)))
  assert float(jnp.min(dropped["layers"]["dropped_fraction"])) > 0
  assert float(jnp.max(full["layers"]["dropped_fraction"])) == 0
  assert float(jnp.max(jnp.abs(full_logits - dropped_logits))) > 1e-4
