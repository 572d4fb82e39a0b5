"""transformers' peer (moe.hub.torch_peer, moe.train.peer_step) computes what this codebase
computes: the same logits from the same weights, the same loss and, after a training step,
the same parameters; and experiments.bench_train times both end to end."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.capabilities import import_or_skip

torch = import_or_skip("torch", "torch")
transformers = import_or_skip("transformers", "torch")

from data.input_pipeline import random_batch  # noqa: E402
from experiments import bench_train  # noqa: E402
from moe.hub.safetensors_export import public_tensors  # noqa: E402
from moe.hub.torch_peer import build_peer, load_public, new_peer, peer_batch, peer_tensors  # noqa: E402
from moe.model.config import ModelConfig  # noqa: E402
from moe.model.decoder import Transformer  # noqa: E402
from moe.model.presets import get_preset  # noqa: E402
from moe.train.config import TrainConfig  # noqa: E402
from moe.train.peer_step import peer_decay, peer_train_step  # noqa: E402
from moe.train.state import create_state  # noqa: E402
from moe.train.steps import make_steps  # noqa: E402

# init_std 0.1: activations and router scores far from uniform, so routing varies by token.
DENSE = ModelConfig(name="t_dense", vocab_size=96, d_model=32, n_layers=2, n_heads=4,
                    max_seq_len=64, dense_ffn_width=48, init_std=0.1)
MOE = DENSE.replace(name="t_moe", n_layers=3, first_k_dense_replace=1, n_routed_experts=8,
                    n_shared_experts=1, n_activated_experts=3, expert_width=16)


def params_of(cfg, seed=0):
  return nnx.state(Transformer(cfg, nnx.Rngs(seed)), nnx.Param)


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_peer_logits_match(cfg):
  model = Transformer(cfg, nnx.Rngs(0))
  peer = build_peer(cfg, nnx.state(model, nnx.Param))
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 24))
  with torch.no_grad():
    theirs = peer(torch.as_tensor(tokens)).numpy()
  ours, _ = model(jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4)
  assert np.std(theirs) > 0.1  # not degenerate


def test_weight_mapping_is_complete_and_checked():
  params = params_of(MOE)
  tensors = dict(public_tensors(MOE, params))
  peer = build_peer(MOE, params)
  back = peer_tensors(peer)
  assert set(back) == set(tensors)
  for name, t in tensors.items():
    np.testing.assert_array_equal(back[name], t, err_msg=name)
  missing = {k: v for k, v in tensors.items() if k != "model.layers.2.mlp.experts.5.up_proj.weight"}
  with pytest.raises(KeyError, match="experts.5.up_proj"):
    load_public(peer, missing)
  with pytest.raises(ValueError, match="no peer parameter"):
    load_public(peer, dict(tensors, **{"model.layers.9.mlp.gate.weight": np.zeros((8, 32))}))
  with pytest.raises(ValueError, match="model.norm.weight"):
    load_public(peer, dict(tensors, **{"model.norm.weight": np.zeros(16, np.float32)}))
  # Weight decay as this codebase's mask: none on norm scales, on every matrix.
  decay = peer_decay(peer, MOE)
  assert {n for n, d in decay.items() if not d} == {
      n for n in decay if n.endswith("layernorm.weight") or n == "model.norm.weight"}
  # A dense model's peer, and a MoE without shared experts (zero-size in the peer).
  no_shared = MOE.replace(n_shared_experts=0)
  assert set(peer_tensors(build_peer(no_shared, params_of(no_shared)))) == set(
      dict(public_tensors(no_shared, params_of(no_shared))))


def test_peer_refuses_what_it_does_not_compute():
  for cfg in (MOE.replace(router="gshard", n_activated_experts=2), MOE.replace(norm_topk_prob=True),
              MOE.replace(dtype="bfloat16")):
    with pytest.raises(ValueError, match="peer"):
      build_peer(cfg, params_of(MOE))


TRAIN = TrainConfig(warmup_steps=2)
# Two steps: one Adam step is g / |g| (bias-corrected), blind to the betas and to the
# gradient's scale (clipping); the second sees both, and the schedule's next rate.
STEPS = 2


@pytest.fixture(scope="module")
def stepped():
  """(cfg, initial public tensors, ours after STEPS steps (public), each step's metrics,
  batch) of MOE without the balance loss: both sides then minimise the LM loss alone."""
  cfg = MOE.replace(expert_balance_alpha=0.0)
  graphdef, state = create_state(cfg, TRAIN)
  model, _ = nnx.merge(graphdef, state)
  initial = dict(public_tensors(cfg, nnx.state(model, nnx.Param)))
  batch = random_batch(4, 16, cfg.vocab_size)
  train, metrics = make_steps(graphdef, state).train, []
  for _ in range(STEPS):
    state, m = train(state, batch, jax.random.key(0))
    metrics.append(m)
  model, _ = nnx.merge(graphdef, state)
  return cfg, initial, dict(public_tensors(cfg, nnx.state(model, nnx.Param))), metrics, batch


def peer_after_steps(cfg, initial, batch, train_cfg):
  """The peer's losses of STEPS steps from `initial`, and its parameters (public)."""
  peer = new_peer(cfg)
  load_public(peer, initial)
  step = peer_train_step(peer, cfg, train_cfg)
  losses = [float(step(*peer_batch(batch))) for _ in range(STEPS)]
  return losses, peer_tensors(peer)


def mismatches(ours, theirs) -> tuple[int, int]:
  """(elements outside rtol 1e-4 + atol 1e-6, elements)."""
  bad = sum(int(np.sum(~np.isclose(theirs[n], ours[n], rtol=1e-4, atol=1e-6))) for n in ours)
  return bad, sum(t.size for t in ours.values())


def test_peer_step_matches_ours(stepped):
  """The same losses, and the same parameters after AdamW. Adam divides each gradient by
  its own magnitude, so an element whose gradient nearly cancels (|g| at f32 rounding
  level) moves by a different fraction of the step in each implementation: a handful of
  the ~50k elements may differ, by at most the steps' size."""
  cfg, initial, ours, metrics, batch = stepped
  assert all(float(m["grad_norm"]) > TRAIN.clip_norm for m in metrics)  # clipping is exercised
  losses, theirs = peer_after_steps(cfg, initial, batch, TRAIN)
  np.testing.assert_allclose(losses, [float(m["lm_loss"]) for m in metrics], rtol=1e-5)
  assert set(theirs) == set(ours)
  bad, total = mismatches(ours, theirs)
  assert bad <= 1e-3 * total, (bad, total)  # 1-3 seen here; a real difference moves 68-99%
  assert max(float(np.max(np.abs(ours[n] - theirs[n]))) for n in ours) < 2 * STEPS * TRAIN.learning_rate
  moved = sum(int(np.sum(~np.isclose(initial[n], ours[n], rtol=1e-4, atol=1e-6))) for n in ours)
  assert moved > 0.5 * total  # the steps moved most parameters beyond the tolerance


@pytest.mark.parametrize("change", [dict(weight_decay=0.0), dict(clip_norm=100.0), dict(b2=0.9),
                                    dict(warmup_steps=1)])
def test_peer_step_comparison_detects_another_optimizer(stepped, change):
  cfg, initial, ours, _, batch = stepped
  _, theirs = peer_after_steps(cfg, initial, batch, dataclasses.replace(TRAIN, **change))
  bad, total = mismatches(ours, theirs)
  assert bad > 0.3 * total, (change, bad, total)  # each moves 68-99% of the elements


def test_bench_table_end_to_end(tmp_path):
  """One small version of a preset (alpha 0.01: the first step's LM loss still agrees)."""
  small = get_preset("tiny_deepseekmoe").replace(
      name="tiny_deepseekmoe_small", vocab_size=96, d_model=32, n_layers=2, dense_ffn_width=48,
      expert_width=16)
  text, rows, machine = bench_train.table([small], batch_size=2, seq_len=16, warmup=1, steps=1,
                                          runs=1, threads=1, matmul_n=64)
  (row,) = rows
  assert row.preset == small.name and len(row.ours_runs) == len(row.peer_runs) == 1
  assert row.ours_tokens_per_s > 0 and row.peer_tokens_per_s > 0 and row.ours_gflops > 0
  assert abs(row.first_lm_loss - row.peer_first_loss) <= 1e-4 * row.first_lm_loss
  assert machine.jax_matmul_gflops > 0 and machine.torch_matmul_gflops > 0
  assert "| tiny_deepseekmoe_small |" in text and "jnp.dot" in text
  out = tmp_path / "bench.json"
  bench_train.write_json(rows, machine, str(out))
  data = json.loads(out.read_text())
  assert data["rows"][0]["preset"] == small.name and data["rows"][0]["ratio"] == row.ratio
  with pytest.raises(bench_train.PeerMismatchError, match="ours 2.0, peer 2.1"):
    bench_train.check_same_function(2.0, 2.1)
  with pytest.raises(ValueError, match="router='hash'"):
    bench_train.table([small.replace(router="hash", n_activated_experts=1)], matmul_n=64)
