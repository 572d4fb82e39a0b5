"""The chunked LM head + cross-entropy (ModelConfig.loss_chunk_tokens) equals the unchunked
loss, value and gradients, and never builds [B, S, vocab] logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data.input_pipeline import random_batch
from moe.model.decoder import Transformer
from moe.model.loss import chunked_lm_loss, chunked_token_nll, lm_loss, objective, token_nll
from tests.data_fixtures import small_model


@pytest.mark.parametrize("chunk", [8, 20, 64])  # 20: the rows are padded to a multiple
def test_chunked_loss_equals_the_full_loss(chunk):
  ks = jax.random.split(jax.random.key(0), 4)
  b, s, d, v = 3, 40, 16, 50
  h, head = jax.random.normal(ks[0], (b, s, d)), jax.random.normal(ks[1], (d, v))
  targets = jax.random.randint(ks[2], (b, s), 0, v)
  weights = (jax.random.uniform(ks[3], (b, s)) > 0.3).astype(jnp.float32)
  full = lambda h, w: lm_loss(jnp.einsum("bsd,dv->bsv", h, w), targets, weights)
  part = lambda h, w: chunked_lm_loss(h, w, targets, weights, chunk)
  np.testing.assert_allclose(part(h, head), full(h, head), rtol=1e-6)
  for g, g_ref in zip(jax.grad(part, (0, 1))(h, head), jax.grad(full, (0, 1))(h, head)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
  # Each position's loss (evaluation's per-document losses), chunked or not.
  per_position = token_nll(jnp.einsum("bsd,dv->bsv", h, head), targets)
  np.testing.assert_allclose(chunked_token_nll(h, head, targets, chunk), per_position, rtol=1e-5)
  np.testing.assert_allclose(jnp.sum(per_position * weights) / jnp.sum(weights), full(h, head), rtol=1e-6)


def test_objective_with_chunks_equals_the_unchunked_objective():
  cfg = small_model()
  batch = random_batch(2, 32, cfg.vocab_size)
  graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)

  def loss(params, chunk):
    model = nnx.merge(graphdef, params)
    model.cfg = cfg.replace(loss_chunk_tokens=chunk)
    return objective(model, batch["inputs"], batch["targets"], batch["weights"],
                     batch["segment_ids"], batch["positions"])[0]

  (l0, g0), (l1, g1) = (jax.value_and_grad(loss)(params, c) for c in (0, 16))
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

  def evaluated(chunk):  # the evaluation's objective: per-position losses as well
    model = nnx.merge(graphdef, params)
    model.cfg = cfg.replace(loss_chunk_tokens=chunk)
    return objective(model, batch["inputs"], batch["targets"], batch["weights"], batch["segment_ids"],
                     batch["positions"], token_losses=True)[1]

  m0, m1 = evaluated(0), evaluated(16)
  np.testing.assert_allclose(m1["token_nll"], m0["token_nll"], rtol=1e-5)
  np.testing.assert_allclose(m1["lm_loss"], m0["lm_loss"], rtol=1e-6)
  w = np.asarray(batch["weights"], np.float32)
  np.testing.assert_allclose(np.sum(m0["token_nll"]) / w.sum(), m0["lm_loss"], rtol=1e-6)


def test_chunked_loss_holds_no_full_logits():
  b, s, d, v = 4, 1024, 64, 8192
  h = jax.ShapeDtypeStruct((b, s, d), jnp.float32)
  head = jax.ShapeDtypeStruct((d, v), jnp.float32)
  t = jax.ShapeDtypeStruct((b, s), jnp.int32)
  temp = lambda f: jax.jit(jax.grad(f, (0, 1))).lower(h, head, t).compile().memory_analysis().temp_size_in_bytes
  full = temp(lambda h, w, t: lm_loss(jnp.einsum("bsd,dv->bsv", h, w), t))
  chunked = temp(lambda h, w, t: chunked_lm_loss(h, w, t, None, 128))
  assert full >= b * s * v * 4 and chunked < full / 4
