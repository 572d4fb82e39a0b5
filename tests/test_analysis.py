"""The paper's analyses: interventions on routing, token categories, specialization.

Each intervention is checked against an independent way to get the same model: a config
with another K' or capacity factor, weights with the shared experts zeroed, or experts
reordered under a router whose scores all tie.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data.code_categories import CATEGORIES, char_categories
from data.input_pipeline import make_datasets
from moe.model.decoder import Transformer
from moe.model.intervention import Intervention, intervene, rerouted
from moe.model.presets import get_preset
from moe.model.routers import Route
from moe.research import analyses, report, specialization
from moe.train.config import TrainConfig
from moe.train.evaluate import evaluate_checkpoint
from moe.train.loop import train_and_evaluate
from moe.train.restore import RestoredRun, restore_run
from tests.data_fixtures import small_data_config, small_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus):
  """A short run of a small DeepSeekMoE (15 routed experts, 1 shared, top-7) on the corpus."""
  workdir = tmp_path_factory.mktemp("analysis_run")
  train_and_evaluate(
      str(workdir), small_model(), small_data_config(small_corpus, eval_batches=1),
      TrainConfig(steps=6, warmup_steps=1, log_every=3, eval_every=6, checkpoint_every=6,
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
  # Re-softmaxed: the survivors' probabilities over their sum (1 - the masked expert's).
  r = rerouted(cfg, route, Intervention(mask_top=1, resoftmax=True))
  np.testing.assert_array_equal(r.expert_idx, [[1, 3], [4, 1]])
  np.testing.assert_allclose(r.gates, [[0.4, 0.3], [0.5, 0.25]], rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Parameter surgery: the same model reached without an intervention.

def with_params(model, cfg, edit=lambda params: None):
  """A model of `cfg` holding `model`'s parameters (as a pure dict), changed by `edit`."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  edit(params)
  other = Transformer(cfg, nnx.Rngs(0))
  state = nnx.state(other, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(other, state)
  return other


def zero_shared(params):
  for stack in params["stacks"].values():
    ffn = stack["blocks"]["ffn"]
    if "shared" in ffn:
      ffn["shared"]["w_down"] = jnp.zeros_like(ffn["shared"]["w_down"])


def tie_router_and_roll_experts(shift):
  """Zero router (every score 1/N': top-k takes the lowest indices) with experts rolled, so
  that index j holds the old expert j + shift."""
  def edit(params):
    for stack in params["stacks"].values():
      ffn = stack["blocks"]["ffn"]
      if "router" in ffn:
        ffn["router"] = jnp.zeros_like(ffn["router"])
        for name, w in ffn["experts"].items():
          ffn["experts"][name] = jnp.roll(w, -shift, axis=1)  # axis 0 is the layer
  return edit


def logits_under(model, tokens, iv=Intervention()):
  graphdef, state = nnx.split(model)

  @jax.jit  # a new function per call: the intervention is read when tracing
  def f(state, tokens):
    with intervene(iv):
      return nnx.merge(graphdef, state)(tokens)

  return f(state, tokens)


def test_interventions_equal_the_models_they_stand_for():
  cfg = small_model(n_layers=2, init_std=0.05)  # experts distinct enough to tell apart
  model = Transformer(cfg, nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  k = cfg.n_activated_experts
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  base, _ = logits_under(model, tokens)
  same, aux = logits_under(model, tokens, Intervention(n_activated=k, capture=True))
  close(same, base)
  assert aux["layers"]["expert_idx"].shape == (cfg.n_moe_layers, 32, k)

  fewer = logits_under(model, tokens, Intervention(n_activated=2))[0]
  close(fewer, logits_under(with_params(model, cfg.replace(n_activated_experts=2)), tokens)[0])
  assert float(jnp.max(jnp.abs(fewer - base))) > 1e-3  # and it is another model

  no_shared = logits_under(model, tokens, Intervention(drop_shared=True, n_activated=k + 1))[0]
  zeroed = with_params(model, cfg.replace(n_activated_experts=k + 1), zero_shared)
  close(no_shared, logits_under(zeroed, tokens)[0])

  m = 3
  tied = with_params(model, cfg, tie_router_and_roll_experts(0))
  masked = logits_under(tied, tokens, Intervention(mask_top=m))[0]
  close(masked, logits_under(with_params(model, cfg, tie_router_and_roll_experts(m)), tokens)[0])
  assert float(jnp.max(jnp.abs(masked - logits_under(tied, tokens)[0]))) > 1e-3


def test_capacity_intervention_equals_the_config_and_stops_dropping():
  cfg = get_preset("tiny_gshard").replace(vocab_size=64, d_model=32, n_layers=2, dense_ffn_width=48,
                                          expert_width=48, capacity_factor=0.5, init_std=0.05)
  model = Transformer(cfg, nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  factor = float(cfg.n_routed_experts)
  dropped_logits, dropped = logits_under(model, tokens)
  full_logits, full = logits_under(model, tokens, Intervention(capacity_factor=factor))
  assert float(jnp.min(dropped["layers"]["dropped_fraction"])) > 0
  assert float(jnp.max(full["layers"]["dropped_fraction"])) == 0
  np.testing.assert_allclose(
      full_logits, logits_under(with_params(model, cfg.replace(capacity_factor=factor)), tokens)[0],
      rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(full_logits - dropped_logits))) > 1e-3


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


def test_mutual_information_against_entropies():
  mi = specialization.mutual_information
  assert mi(np.array([[5, 5], [5, 5]])) == pytest.approx(0.0, abs=1e-12)
  assert mi(np.array([[7, 0], [0, 7]])) == pytest.approx(1.0)
  counts = np.random.default_rng(0).integers(0, 20, (6, 9))
  h = lambda p: -np.sum(p[p > 0] * np.log2(p[p > 0]))
  p = counts / counts.sum()
  assert mi(counts) == pytest.approx(h(p.sum(1)) + h(p.sum(0)) - h(p.ravel()), rel=1e-9)


# ---------------------------------------------------------------------------------------
# The analyses over a trained run's checkpoint.

def surgery(run: RestoredRun, cfg, edit=lambda params: None) -> RestoredRun:
  """The run with its model's parameters edited (and possibly another config)."""
  graphdef, params = nnx.split(with_params(nnx.merge(run.graphdef, run.params), cfg, edit), nnx.Param)
  return run._replace(model_cfg=cfg, graphdef=graphdef, params=params)


def test_analyses_of_a_trained_run(trained):
  run = restore_run(trained)
  cfg = run.model_cfg
  k = cfg.n_activated_experts
  batches = make_datasets(run.data_cfg, cfg.vocab_size).eval_batches
  loss_of = lambda r: analyses.evaluate_with(r, batches)["loss"]
  plain = evaluate_checkpoint(trained)["eval_loss"]

  red = analyses.disable_top_experts(run, batches, fractions=(0, 2 / 16))
  assert red[0][:2] == (0, 0) and red[0][2] == pytest.approx(plain, rel=1e-6)
  assert red[1][1] == 2
  tied = surgery(run, cfg, tie_router_and_roll_experts(0))
  (_, masked, tied_loss), = analyses.disable_top_experts(tied, batches, fractions=(3 / 16,))
  assert masked == 3
  assert tied_loss == pytest.approx(loss_of(surgery(run, cfg, tie_router_and_roll_experts(3))),
                                    rel=1e-5)

  shared = analyses.without_shared_experts(run, batches)
  assert shared["loss"] == pytest.approx(plain, rel=1e-6)
  zeroed = surgery(run, cfg.replace(n_activated_experts=k + 1), zero_shared)
  assert shared["loss_without_shared"] == pytest.approx(loss_of(zeroed), rel=1e-5)

  ks = analyses.vary_activated(run, batches, ks=[1, k])
  assert ks[1] == (k, pytest.approx(plain, rel=1e-6))
  assert ks[0][1] == pytest.approx(loss_of(surgery(run, cfg.replace(n_activated_experts=1))), rel=1e-5)


def test_specialization_counts_match_a_direct_count(trained):
  run = restore_run(trained)
  spec = specialization.specialization(run, max_tokens=500, batch_size=4)
  assert spec.tokens == 500
  # Independently: every category row through the model at once, counted in a plain loop.
  ids, cats = specialization.category_rows(run, 500)
  model = nnx.merge(run.graphdef, run.params)
  with intervene(Intervention(capture=True)):
    chosen = np.asarray(model(jnp.asarray(ids))[1]["layers"]["expert_idx"])  # [L, R*S, K']
  counts = np.zeros_like(spec.counts)
  for layer in range(counts.shape[0]):
    for t, c in enumerate(cats.reshape(-1)):
      if c >= 0:
        for e in chosen[layer, t]:
          counts[layer, c, e] += 1
  np.testing.assert_array_equal(spec.counts, counts)
  np.testing.assert_allclose(spec.mutual_info, [specialization.mutual_information(c) for c in counts])
  cat_p = np.bincount(cats[cats >= 0], minlength=len(specialization.CATEGORIES)) / spec.tokens
  h = -np.sum(cat_p[cat_p > 0] * np.log2(cat_p[cat_p > 0]))
  assert spec.category_entropy == pytest.approx(h)
  np.testing.assert_allclose(spec.normalized, spec.mutual_info / h)
  assert 0 < spec.token_id_info < h


def test_token_id_null_counts_each_token_k_times_on_fixed_experts():
  ids = np.array([5, 5, 7, 5, 7, 2])
  cats = np.array([0, 1, 1, -1, 2, 0], np.int8)
  counts = specialization.token_id_routing_counts(ids, cats, 10, 6, 2, seed=0)
  assert counts.sum() == 5 * 2
  # Token 5 (categories 0 and 1) lands on the same two experts in both rows.
  e5 = np.flatnonzero(specialization.token_id_routing_counts(
      np.array([5]), np.array([1], np.int8), 10, 6, 2, seed=0)[1])
  assert len(e5) == 2 and np.all(counts[1][e5] >= 1) and np.all(counts[0][e5] >= 1)
  # Routing by token alone: the MI cannot exceed what the token id carries, I(C; token).
  tok_counts = np.zeros((len(specialization.CATEGORIES), 10))
  np.add.at(tok_counts, (cats[cats >= 0], ids[cats >= 0]), 1)
  assert specialization.mutual_information(counts) <= specialization.mutual_information(tok_counts) + 1e-9


def test_analyze_writes_tables_and_plots(trained, tmp_path):
  out = tmp_path / "out"
  results = report.analyze({"run": trained}, str(out), analyses=("redundancy", "redundancy_resoftmax",
                                                                "redundancy_shared_off", "load", "categories"),
                           max_tokens=300, log=lambda *_: None)
  assert set(results["run"]) >= {"loss", "redundancy", "load", "categories"}
  plain, soft, off = (results["run"][k] for k in ("redundancy", "redundancy_resoftmax", "redundancy_shared_off"))
  assert soft[0] == plain[0] and soft[-1][2] != plain[-1][2]  # nothing masked at p = 0: nothing to re-softmax
  assert off[0][2] != plain[0][2] and [c[1] for c in off] == [c[1] for c in plain]
  assert "topk" not in results["run"]
  for png in ("load_run.png", "categories_run.png", "redundancy.png"):
    assert os.path.getsize(out / png) > 1000, png
  text = report.report(results)
  assert "| p=0.0625 |" in text and "I(token category; chosen expert)" in text
  assert "... with the gates re-softmaxed over the experts left (validation loss" in text
  assert "... with the shared experts off as well (validation loss" in text
  first = results["run"]["redundancy"][0]  # (p, experts masked, loss): the count is in the run's row
  assert f"| run | {first[2]:.3f} ({first[1]} off) |" in text
  json.dumps(results)  # JSON-able
  with pytest.raises(ValueError, match="unknown analyses"):
    report.analyze({"run": trained}, str(out), analyses=("nope",))
