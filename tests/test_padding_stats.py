"""Routing statistics and balance losses exclude padding (segment id 0, weight 0) by
construction: padded positions in a batch, padding rows, and whole padding batches (as
multi-host evaluation adds them) leave them as the real tokens alone give them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data.input_pipeline import padding_batch, random_batch, to_batch
from moe.dispatch import capacity
from moe.model import balance
from moe.model.decoder import Transformer
from moe.model.loss import real_tokens
from moe.train.evaluate import evaluate
from moe.train.lm_eval import LM, score_rows
from moe.train.steps import make_steps
from tests.data_fixtures import small_model

# Of the tokens' mean (linear in them): batches of real tokens combine to all the tokens'.
LINEAR = ("load", "router_entropy", "gate_mass", "dropped_fraction", "z_loss")


def test_masked_losses_and_stats_are_those_of_the_real_tokens():
  t, n, k = 24, 8, 2
  logits = jax.random.normal(jax.random.key(0), (t, n))
  scores = jax.nn.softmax(logits, axis=-1)
  _, idx = jax.lax.top_k(scores, k)
  mask = jnp.arange(t) % 3 != 1  # 16 real tokens
  real = np.flatnonzero(mask)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  close(balance.expert_balance_loss(scores, idx, mask), balance.expert_balance_loss(scores[real], idx[real]))
  close(balance.device_balance_loss(scores, idx, 2, mask),
        balance.device_balance_loss(scores[real], idx[real], 2))
  close(balance.z_loss(logits, mask), balance.z_loss(logits[real]))
  got = balance.routing_stats(idx, n, 0, scores, mask)
  for key, want in balance.routing_stats(idx[real], n, 0, scores[real]).items():
    close(got[key], want)
  # No real token: zeros, not NaN.
  none = jnp.zeros(t, bool)
  assert float(balance.expert_balance_loss(scores, idx, none)) == 0.0
  assert all(not np.any(np.asarray(v)) for v in balance.routing_stats(idx, n, 0, scores, none).values())


def test_dropped_pairs_are_counted_for_real_tokens_only():
  # 4 tokens all on expert 0, one slot: tokens 1-3 dropped; token 3 is padding.
  idx = jnp.zeros((4, 1), jnp.int32)
  assert int(capacity.assign_slots(idx, 2, cap=1).n_dropped) == 3
  slots = capacity.assign_slots(idx, 2, cap=1, token_mask=jnp.array([True, True, True, False]))
  assert int(slots.n_dropped) == 2
  stats = balance.routing_stats(idx, 2, slots.n_dropped, mask=jnp.array([True, True, True, False]))
  np.testing.assert_allclose(stats["dropped_fraction"], 2 / 3, rtol=1e-6)


def test_a_token_is_padding_in_segment_0_without_weight():
  seg = np.array([[1, 1, 2, 0, 0]])
  w = np.array([[1, 0, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(real_tokens(seg, w), [[True, True, True, False, False]])
  # Unpacked rows (segment 0 everywhere) with loss weights count their weighted tokens.
  np.testing.assert_array_equal(real_tokens(np.zeros_like(seg), np.ones_like(w)), np.ones((1, 5), bool))
  assert real_tokens(None, w) is None


@pytest.fixture(scope="module")
def eval_model():
  """(steps, parameters, a, b, padded, graphdef) of a small untrained DeepSeekMoE: batches
  a, b [2, 16] of real tokens, and b's rows padded to [4, 32] (each row's second half and
  two more rows padding, with arbitrary token ids, not 0, so they would route somewhere)."""
  cfg = small_model()
  graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
  a, b = (random_batch(2, 16, cfg.vocab_size, seed=s) for s in (1, 2))
  junk = np.random.default_rng(3).integers(1, cfg.vocab_size, (4, 32)).astype(np.int32)
  tokens, seg, pos = junk.copy(), np.zeros((4, 32), np.int32), np.zeros((4, 32), np.int32)
  tokens[:2, :16], seg[:2, :16], pos[:2, :16] = b["inputs"], b["segment_ids"], b["positions"]
  padded = to_batch(tokens, seg, pos)
  np.testing.assert_array_equal(padded["weights"][:2, :16], b["weights"])
  return make_steps(graphdef, params), params, a, b, padded, graphdef


def _assert_layers_close(got, want, keys=None):
  assert set(got) == set(want)
  for k in keys or want:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)


def test_padded_positions_and_rows_leave_the_routing_stats_unchanged(eval_model):
  """A batch three quarters padding (half of each real row, and whole rows) evaluates to
  the routing statistics, balance losses and loss of its real rows alone."""
  steps, params, _, b, padded, _ = eval_model
  got, want = evaluate(steps, params, [padded]), evaluate(steps, params, [b])
  assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
  _assert_layers_close(got["layers"], want["layers"])


def test_padding_batches_leave_the_aggregated_stats_unchanged(eval_model):
  """A weight-0 padding batch (agree_eval_batches) added to an eval set changes neither
  loss nor statistics; batches combine weighted by their real tokens."""
  steps, params, a, b, padded, _ = eval_model
  want = evaluate(steps, params, [a, b])
  pad = padding_batch(2, 16)
  for batches in ([a, pad, b], [pad, a, b, pad]):
    got = evaluate(steps, params, batches)
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-6)
    _assert_layers_close(got["layers"], want["layers"])
  # b as a mostly-padding batch weighs what its 32 real tokens do.
  got = evaluate(steps, params, [a, padded])
  assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
  _assert_layers_close(got["layers"], want["layers"])


def test_lm_eval_stats_do_not_depend_on_the_padding_of_its_batches(eval_model):
  """score_rows pads rows to seq_len and batches to batch_size: the statistics that are
  means over tokens are the same one row per batch or three rows and a padding row."""
  _, params, a, b, _, graphdef = eval_model
  lm = LM(graphdef, params)
  rows = [(np.append(a["inputs"][0], 5)[:12], np.ones(11, np.float32)),
          (np.append(b["inputs"][1], 7), np.ones(16, np.float32)),
          (a["inputs"][1][:6], np.ones(5, np.float32))]
  one = score_rows(lm, rows, 16, batch_size=1)
  four = score_rows(lm, rows, 16, batch_size=4)
  np.testing.assert_allclose(one[0], four[0], rtol=1e-5)
  _assert_layers_close(four[2], one[2], LINEAR)
