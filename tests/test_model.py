import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.model.decoder import Transformer, layer_runs
from moe.model.loss import lm_loss, objective
from moe.model.presets import get_preset

V = 64
SMALL = dict(vocab_size=V, d_model=32, n_heads=4, n_layers=3, dense_ffn_width=48, max_seq_len=64)


def small(preset="tiny_deepseekmoe", **kw):
  cfg = get_preset(preset).replace(**SMALL)
  if cfg.is_moe_model:
    cfg = cfg.replace(expert_width=16 if preset == "tiny_deepseekmoe" else 48)
  return cfg.replace(**kw)


@pytest.fixture(scope="module")
def model():
  return Transformer(small(first_k_dense_replace=1), nnx.Rngs(0))


@jax.jit
def _logits(graphdef, state, tokens, segment_ids):
  return nnx.merge(graphdef, state)(tokens, segment_ids)[0]


def logits_of(model, tokens, segment_ids=None):
  if segment_ids is None:
    segment_ids = jnp.zeros_like(tokens)
  return _logits(*nnx.split(model), tokens, segment_ids)


def test_causal_future_tokens_do_not_change_earlier_logits(model):
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, V)
  changed = tokens.at[:, 10:].set((tokens[:, 10:] + 7) % V)
  a, b = logits_of(model, tokens), logits_of(model, changed)
  # Not bit-equal: the routed experts' matmuls see other rows beside an earlier token when
  # later tokens route elsewhere, and XLA:CPU's blocking then rounds differently (~4e-9).
  np.testing.assert_allclose(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
  assert np.max(np.abs(a[:, 10:] - b[:, 10:])) > 1e-4


def test_packed_segments_do_not_leak(model):
  # Two documents packed in one row; positions restart at each.
  tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, V)
  seg = jnp.array([[1] * 6 + [2] * 10])
  pos = jnp.array([list(range(6)) + list(range(10))])
  graphdef, state = nnx.split(model)
  packed = nnx.merge(graphdef, state)(tokens, seg, pos)[0]
  alone = nnx.merge(graphdef, state)(tokens[:, 6:])[0]
  # Routing of the second document does not see the first (per-token routing); logits match.
  np.testing.assert_allclose(packed[:, 6:], alone, rtol=1e-5, atol=1e-5)
  other_first_doc = tokens.at[:, :6].set((tokens[:, :6] + 3) % V)
  packed2 = nnx.merge(graphdef, state)(other_first_doc, seg, pos)[0]
  np.testing.assert_allclose(packed[:, 6:], packed2[:, 6:], rtol=1e-5, atol=1e-5)


def test_scan_equals_unrolled_loop(model):
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, V)
  cfg = dataclasses.replace(model.cfg, scan_layers=False)
  graphdef, state = nnx.split(model)
  unrolled = Transformer(cfg, nnx.Rngs(1))
  nnx.update(unrolled, state)
  (a, aux_a), (b, aux_b) = model(tokens), unrolled(tokens)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  for x, y in zip(jax.tree.leaves(aux_a), jax.tree.leaves(aux_b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_layer_stacks_and_scanned_aux_losses(model):
  assert layer_runs(model.cfg) == [("dense", 1), ("moe", 2)]
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, V)
  _, aux = model(tokens)
  layers = aux["layers"]
  assert layers["load"].shape == (2, model.cfg.n_routed_experts)
  np.testing.assert_allclose(jnp.sum(layers["load"], -1), 1.0, rtol=1e-6)
  # Every scanned layer contributes its own (distinct) balance loss; weighted sum reported.
  assert float(jnp.abs(layers["expert_balance_loss"][0] - layers["expert_balance_loss"][1])) > 0
  np.testing.assert_allclose(aux["losses"]["expert_balance_loss"],
                             model.cfg.expert_balance_alpha * jnp.sum(layers["expert_balance_loss"]),
                             rtol=1e-6)


def test_objective_adds_weighted_aux_losses():
  cfg = small(expert_balance_alpha=0.5, device_balance_alpha=0.25, n_device_groups=5,
              router_z_loss_alpha=0.125)
  m = Transformer(cfg, nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, V)
  loss, metrics = objective(m, tokens[:, :-1], tokens[:, 1:])
  layers = metrics["layers"]
  expected = (metrics["lm_loss"] + 0.5 * jnp.sum(layers["expert_balance_loss"])
              + 0.25 * jnp.sum(layers["device_balance_loss"]) + 0.125 * jnp.sum(layers["z_loss"]))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert float(metrics["aux_loss"]) > 0.5 * cfg.n_moe_layers * 0.99  # f.P >= ~1 per layer


def test_balance_loss_gradient_reaches_router():
  m = Transformer(small(expert_balance_alpha=1.0), nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, V)
  grads = nnx.grad(lambda m: objective(m, tokens[:, :-1], tokens[:, 1:])[1]["aux_loss"])(m)
  router_grad = grads["stacks"][0]["blocks"]["ffn"]["router"][...]
  assert float(jnp.max(jnp.abs(router_grad))) > 0
  # The LM head gets no gradient from the balance loss.
  assert float(jnp.max(jnp.abs(grads["lm_head"][...]))) == 0


def test_lm_loss_weights():
  logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))
  targets = jnp.array([[0, 1]])
  np.testing.assert_allclose(lm_loss(logits, targets, jnp.array([[1, 0]])), np.log(2), rtol=1e-6)
  np.testing.assert_allclose(lm_loss(logits, targets), (np.log(2) + np.log(10)) / 2, rtol=1e-6)


@pytest.mark.parametrize("preset", ["tiny_gshard", "tiny_switch", "tiny_hash", "tiny_dense"])
def test_baselines_run_and_report(preset):
  cfg = small(preset)
  m = Transformer(cfg, nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(6), (2, 16), 0, V)
  loss, metrics = objective(m, tokens[:, :-1], tokens[:, 1:], key=jax.random.key(7))
  assert np.isfinite(float(loss))
  if cfg.is_moe_model:
    frac = metrics["layers"]["dropped_fraction"]
    assert frac.shape == (cfg.n_moe_layers,) and bool(jnp.all((frac >= 0) & (frac <= 1)))
    if preset == "tiny_hash":
      assert float(metrics["aux_loss"]) == 0.0 and float(jnp.sum(frac)) == 0.0
    mass = metrics["layers"]["gate_mass"]  # hash: gate 1; gshard: renormalised pair
    if preset in ("tiny_hash", "tiny_gshard"):
      np.testing.assert_allclose(mass, 1.0, rtol=1e-5)
    else:  # switch: the top-1 probability, below 1 and at least 1/N'
      assert bool(jnp.all((mass < 1) & (mass >= 1 / cfg.n_routed_experts)))


def test_switch_drops_tokens_when_capacity_is_tight():
  cfg = small("tiny_switch", capacity_factor=0.25)
  m = Transformer(cfg, nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(8), (2, 16), 0, V)
  _, aux = m(tokens)
  assert float(jnp.min(aux["layers"]["dropped_fraction"])) >= 0.75 - 1e-6


def test_gshard_second_expert_is_random_only_with_key():
  cfg = small("tiny_gshard", capacity_factor=8.0)
  m = Transformer(cfg, nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(9), (2, 16), 0, V)
  a, b = m(tokens)[0], m(tokens)[0]
  np.testing.assert_array_equal(a, b)
  c, d = m(tokens, key=jax.random.key(1))[0], m(tokens, key=jax.random.key(2))[0]
  assert float(jnp.max(jnp.abs(c - d))) > 0


def test_bfloat16_compute_and_remat_track_float32(monkeypatch):
  """bf16 activations with remat give the f32 model's loss within 1% and its gradients
  within cosine similarity 0.99 (bf16 keeps 8 mantissa bits); parameters stay f32 and the
  router runs in f32 on bf16 activations."""
  from moe.model import routers
  seen = []
  router_logits = routers.router_logits

  def spy(x, w):
    logits = router_logits(x, w)
    seen.append((x.dtype, logits.dtype))
    return logits

  monkeypatch.setattr(routers, "router_logits", spy)
  tokens = jax.random.randint(jax.random.key(10), (2, 12), 0, V)
  f32 = Transformer(small(init_std=0.05), nnx.Rngs(0))
  bf16 = Transformer(small(init_std=0.05, dtype="bfloat16", remat=True), nnx.Rngs(0))
  grad = lambda m: nnx.value_and_grad(lambda m: objective(m, tokens[:, :-1], tokens[:, 1:])[0])(m)
  (loss32, g32), (loss16, g16) = grad(f32), grad(bf16)
  assert float(loss16) == pytest.approx(float(loss32), rel=1e-2)
  for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):
    a, b = np.ravel(a), np.ravel(b)
    assert b.dtype == np.float32
    cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    assert cos > 0.99 or np.linalg.norm(a) < 1e-6, cos
  assert bf16.embed[...].dtype == jnp.float32
  assert (jnp.bfloat16, jnp.float32) in seen and all(out == jnp.float32 for _, out in seen)


def test_parameters_carry_logical_axes(model):
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata()["axes"]
    assert len(axes) == var.ndim, path
    if path[0] == "stacks":
      assert axes[0] == "layers"


@pytest.mark.parametrize("preset", ["tiny_switch", "tiny_gshard"])
def test_capacity_zero_routes_every_pair_with_the_routers_gates(preset):
  """capacity_factor 0: nothing dropped, and each MoE layer's routed output is the loop
  reference with the router's own gates (GShard's unkept second expert weighted 0)."""
  from moe.model.routers import ROUTERS, RouteArgs, router_logits
  from tests.reference import loop_moe
  cfg = small(preset, capacity_factor=0.0, n_shared_experts=0, init_std=0.3)  # uneven gates
  m = Transformer(cfg, nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(8), (2, 16), 0, V)
  _, aux = m(tokens, key=jax.random.key(3))
  assert float(jnp.max(aux["layers"]["dropped_fraction"])) == 0.0
  moe = m.stacks[-1].blocks.ffn
  layer = jax.tree.map(lambda a: a[0], nnx.state(moe))
  one = nnx.merge(nnx.graphdef(moe), layer)
  x = jax.random.normal(jax.random.key(4), (32, cfg.d_model))
  ids = tokens.reshape(-1)
  key = jax.random.key(5)
  y, aux = one(x, ids, key)
  assert float(aux["dropped_fraction"]) == 0.0
  route = ROUTERS[cfg.router].fn(RouteArgs(cfg, router_logits(x, one.router[...]), ids, key))
  expected = loop_moe(x, route.expert_idx, route.gates, *one.experts.weights(x.dtype), keep=route.keep)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
  if preset == "tiny_gshard":  # the random keep really removed some second choices
    assert not bool(jnp.all(route.keep))


def test_score_bias_selects_but_does_not_weight():
  """topk_bias: with zero bias it is topk; a bias changes the choices, and the gates stay
  the unbiased probabilities of the chosen experts."""
  from moe.model.routers import RouteArgs, route_topk, route_topk_bias
  cfg = small(router="topk_bias")
  logits = jax.random.normal(jax.random.key(0), (64, cfg.n_routed_experts))
  args = RouteArgs(cfg, logits, None, None, jnp.zeros(cfg.n_routed_experts))
  a, b = route_topk(args), route_topk_bias(args)
  np.testing.assert_array_equal(a.expert_idx, b.expert_idx)
  np.testing.assert_allclose(a.gates, b.gates)
  bias = jnp.zeros(cfg.n_routed_experts).at[3].set(100.0)  # expert 3 always chosen
  c = route_topk_bias(args._replace(score_bias=bias))
  assert bool(jnp.all(jnp.any(c.expert_idx == 3, axis=-1)))
  np.testing.assert_allclose(c.gates, jnp.take_along_axis(c.scores, c.expert_idx, -1))
  assert float(jnp.max(c.gates)) < 1.0


def test_bias_updates_balance_load_without_gradients():
  """Repeated sign updates on fixed skewed logits bring the max/mean load down; a train
  step moves the bias by exactly +-u and leaves it out of the gradient and optimizer."""
  from moe.model.balance import routing_stats
  from moe.model.routers import RouteArgs, route_topk_bias
  cfg = small(router="topk_bias", bias_update_rate=0.01)
  n = cfg.n_routed_experts
  logits = jax.random.normal(jax.random.key(1), (512, n)) + jnp.linspace(0.0, 3.0, n)
  bias = jnp.zeros(n)
  loads = []
  for _ in range(250):
    r = route_topk_bias(RouteArgs(cfg, logits, None, None, bias))
    load = routing_stats(r.expert_idx, n, 0)["load"]
    loads.append(float(jnp.max(load)) * n)
    bias = bias + cfg.bias_update_rate * jnp.sign(jnp.mean(load) - load)
  assert loads[0] > 1.9 and max(loads[-20:]) < 1.1, (loads[0], loads[-20:])


@pytest.mark.parametrize("fields", [dict(router="topk_bias"),
                                    dict(router="sigmoid_bias", n_group=3, topk_group=2),
                                    dict(router="topk_bias", n_null_experts=3)],
                         ids=["topk_bias", "sigmoid_bias", "topk_bias_null"])
def test_a_train_step_moves_the_selection_bias_outside_the_gradient(fields):
  """One implementation of the selection bias serves topk_bias and V3's sigmoid_bias (and
  zero-compute targets): a train step moves it by exactly +-u from the load error, and it is
  not a parameter (no gradient, no optimizer state)."""
  from moe.train.config import TrainConfig
  from moe.train.state import create_state
  from moe.train.steps import train_step
  cfg = small(bias_update_rate=0.01, **fields)
  graphdef, state = create_state(cfg, TrainConfig(steps=2, warmup_steps=1))
  tokens = jax.random.randint(jax.random.key(2), (2, 17), 0, V)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((2, 16)),
           "segment_ids": jnp.zeros((2, 16), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(16), (2, 16))}
  state, metrics = train_step(graphdef, state, batch, jax.random.key(3))
  model, _ = nnx.merge(graphdef, state)
  biases = [s.blocks.ffn.score_bias[...] for s in model.stacks if s.blocks.ffn.score_bias is not None]
  got = jnp.concatenate(biases)                                   # [n_moe_layers, N' + null]
  load = metrics["layers"]["load"]
  want = cfg.bias_update_rate * jnp.sign(jnp.mean(load, -1, keepdims=True) - load)
  np.testing.assert_allclose(got, want, atol=1e-7)
  assert metrics["layers"]["score_bias"].shape == (cfg.n_moe_layers, cfg.n_route_targets)
  assert not any("score_bias" in str(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      nnx.state(model, nnx.Param)))
