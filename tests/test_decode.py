"""KV-cache decoding (moe.decode): cached logits equal full recomputation, greedy tokens equal
an independent implementation's, sampling, EOS, compile counts, the few-token MoE path,
a mesh, and experiments.generate end to end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.decode import sampling
from moe.decode.generate import Decoder
from moe.decode.kv_cache import KVCache
from moe.dispatch import few_tokens, registry
from moe.dispatch.sorting import sort_by_expert
from moe.model.config import ModelConfig
from moe.model.decoder import Transformer
from moe.parallel.mesh import MeshConfig, make_mesh
from tests.capabilities import import_or_skip
from tests.reference import loop_moe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64


def config(kind: str, scan: bool) -> ModelConfig:
  """Tiny f32 models; weights large enough (init_std) that logits and routing vary a lot."""
  base = dict(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, dense_ffn_width=48,
              init_std=0.3, scan_layers=scan, max_seq_len=64)
  if kind == "dense":
    return ModelConfig(name="dense", **base)
  return ModelConfig(name="moe", **base, n_routed_experts=8, n_shared_experts=1,
                     n_activated_experts=2, expert_width=16, first_k_dense_replace=1)


def split(cfg: ModelConfig, seed: int = 0):
  return nnx.split(Transformer(cfg, nnx.Rngs(seed)), nnx.Param)


PROMPTS = [[5, 9, 2, 7, 11], list(range(3, 21)), [8, 1]]  # 18 tokens: a clamped last chunk


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscanned"])
@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_cached_logits_equal_recomputation_at_every_step(kind, scan):
  graphdef, params = split(config(kind, scan))
  # Chunks of 16 in a 28-slot cache: the 18-token prompt's second chunk starts at 12.
  dec = Decoder(graphdef, params, batch=3, max_len=28, prefill_chunk=16)
  full = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])  # [B, max_len] -> [B, max_len, V]
  tokens, lengths, _ = dec.pad_prompts(PROMPTS, 10)
  logits, cache = dec.prefill_prompts(tokens, lengths)
  rows = np.arange(3)
  for step in range(10):
    ref = np.asarray(full(params, tokens))[rows, lengths - 1]
    # f32 with other matmul shapes (chunks, one token) sums in another order: 2e-5 seen on
    # one CPU type; a cache bug (wrong slot or position) moves logits by far more than 1e-4.
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-4, err_msg=f"step {step}")
    nxt = np.argmax(ref, axis=-1).astype(np.int32)
    tokens[rows, lengths] = nxt
    logits, cache = dec.step(dec.params, cache, nxt, lengths)
    lengths = lengths + 1
  assert np.std(ref) > 1.0  # logits are far from uniform: the comparison has teeth
  assert dec.traces == {"prefill": 1, "step": 1}


def test_cache_is_preallocated_per_layer_stack():
  graphdef, params = split(config("moe", True))
  dec = Decoder(graphdef, params, batch=3, max_len=28)
  cache, logits = dec.new_state()
  assert logits.shape == (3, VOCAB)
  assert isinstance(cache, KVCache) and cache.max_len == 28
  # [layers, batch, heads, max_len, head_dim] per stack: layer 0 dense, layers 1-2 MoE.
  assert [k.shape for k in cache.keys] == [(1, 3, 4, 28, 8), (2, 3, 4, 28, 8)]


def test_prompts_that_do_not_fit_are_refused():
  dec = Decoder(*split(config("dense", True)), batch=2, max_len=12)
  with pytest.raises(ValueError, match="exceed the decoder's max_len=12"):
    dec.generate([[1] * 8], 5)
  with pytest.raises(ValueError, match="3 prompts for a decoder of batch 2"):
    dec.generate([[1], [2], [3]], 2)
  with pytest.raises(ValueError, match="at least one token"):
    dec.generate([[]], 2)


def test_prefill_and_decode_compile_once_per_batch_and_length():
  dec = Decoder(*split(config("moe", True)), batch=4, max_len=40, prefill_chunk=8)
  runs = [([[1, 2, 3]], 5, sampling.Sampling()),
          ([list(range(1, 20)), [4, 4]], 12, sampling.Sampling(0.8, 5, 0.9)),
          ([[7] * 30, [1], [2, 3], [9] * 11], 10, sampling.Sampling(1.5)),
          ([[3, 1, 4, 1, 5]], 1, sampling.Sampling(top_p=0.5))]
  for seed, (prompts, n, s) in enumerate(runs):
    out = dec.generate(prompts, n, s, seed=seed)
    assert [len(t) for t in out.tokens] == [n] * len(prompts)
  assert dec.traces == {"prefill": 1, "decode": 1}
  assert dec.prefill._cache_size() == 1 and dec.decode._cache_size() == 1


def test_decode_steps_route_without_sorting():
  dec = Decoder(*split(config("moe", True)), batch=2, max_len=16, prefill_chunk=8)
  cache, _ = dec.new_state()
  step = dec.step.lower(dec.params, cache, np.zeros(2, np.int32), np.zeros(2, np.int32)).as_text()
  prefill = dec.prefill.lower(dec.params, cache, np.zeros((2, 8), np.int32), np.int32(0),
                              np.ones(2, np.int32), np.zeros((2, VOCAB), np.float32)).as_text()
  assert "stablehlo.sort" not in step
  assert "stablehlo.sort" in prefill  # the prefill keeps the model's sorted dispatch


# ---------------------------------------------------------------------------------------
# Greedy decoding against transformers' DeepSeek-OCR-2 text model (full recompute each step).

def test_greedy_tokens_equal_a_transformers_reference_loop():
  torch = import_or_skip("torch", "torch")
  import_or_skip("transformers", "torch")
  from tests import hub_fixtures as fx
  from tests.test_hf_parity import HF
  from moe.hub.hf_config import config_from_hf
  from moe.hub.hf_weights import load_public_checkpoint

  ref = fx.reference_model(HF, seed=3)
  lm_head = np.random.default_rng(3).normal(0, 0.3, (HF["vocab_size"], HF["hidden_size"])).astype(np.float32)
  model = Transformer(config_from_hf(HF), nnx.Rngs(0))
  load_public_checkpoint(model, fx.public_tensors(ref, lm_head))
  prompts = [[4, 17, 33], [60, 2, 2, 91, 45, 8, 13, 77, 5], [30, 31, 32, 33, 34, 35]]
  n_new = 12
  expected = []
  with torch.no_grad():
    for p in prompts:
      ids = list(p)
      for _ in range(n_new):
        h = ref(torch.tensor([ids])).last_hidden_state[0, -1].numpy()
        ids.append(int(np.argmax(lm_head @ h)))
      expected.append(ids[len(p):])
  dec = Decoder(*nnx.split(model, nnx.Param), batch=3, max_len=24, prefill_chunk=8)
  got = [t.tolist() for t in dec.generate(prompts, n_new).tokens]
  assert got == expected
  assert len({tuple(e) for e in expected}) == 3


# ---------------------------------------------------------------------------------------
# Sampling and EOS.

def test_top_k_mask_keeps_the_k_highest():
  logits = jnp.array([[1.0, 5.0, 3.0, 2.0], [0.0, -1.0, 4.0, 4.5]])
  kept = np.isfinite(np.asarray(sampling.top_k_mask(logits, jnp.int32(2))))
  np.testing.assert_array_equal(kept, [[False, True, True, False], [False, False, True, True]])
  np.testing.assert_array_equal(sampling.top_k_mask(logits, jnp.int32(0)), logits)  # off


@pytest.mark.parametrize("p, n_kept", [(0.5, 1), (0.7, 2), (0.81, 3), (0.96, 4), (1.0, 4)])
def test_top_p_mask_keeps_the_smallest_set_reaching_p(p, n_kept):
  probs = np.array([0.15, 0.5, 0.05, 0.3])  # ranked: 0.5, 0.3, 0.15, 0.05
  masked = sampling.top_p_mask(jnp.log(jnp.asarray(probs))[None], jnp.float32(p))
  kept = np.isfinite(np.asarray(masked[0]))
  assert kept.sum() == n_kept
  assert set(np.flatnonzero(kept)) == set(np.argsort(-probs)[:n_kept])


def test_sampling_follows_the_cut_distribution():
  logits = jnp.log(jnp.tile(jnp.array([[0.1, 0.4, 0.2, 0.3]]), (20000, 1)))
  draw = lambda s, seed=0: np.bincount(np.asarray(sampling.sample(logits, jax.random.key(seed), s)),
                                       minlength=4) / 20000
  np.testing.assert_allclose(draw(sampling.Sampling(1.0)), [0.1, 0.4, 0.2, 0.3], atol=0.015)
  np.testing.assert_allclose(draw(sampling.Sampling(1.0, top_k=2)), [0, 4 / 7, 0, 3 / 7], atol=0.015)
  np.testing.assert_allclose(draw(sampling.Sampling(1.0, top_p=0.65)), [0, 4 / 7, 0, 3 / 7], atol=0.015)
  assert draw(sampling.Sampling(0.0))[1] == 1.0  # greedy
  hot = draw(sampling.Sampling(4.0))  # a high temperature flattens the distribution
  assert hot[0] > 0.17 and hot[1] < 0.33


def test_sampled_generation_is_reproducible_from_a_seed():
  dec = Decoder(*split(config("moe", True)), batch=2, max_len=24, prefill_chunk=8)
  prompts, hot = [[1, 2, 3], [9, 8, 7, 6]], sampling.Sampling(temperature=3.0)
  run = lambda s, seed: [t.tolist() for t in dec.generate(prompts, 16, s, seed=seed).tokens]
  assert run(hot, 0) == run(hot, 0)
  assert run(hot, 0) != run(hot, 1)
  greedy = run(sampling.Sampling(), 0)
  assert run(hot, 0) != greedy
  # A cut to one token is greedy, whatever the temperature and seed.
  assert run(sampling.Sampling(3.0, top_k=1), 5) == greedy
  assert run(sampling.Sampling(3.0, top_p=1e-6), 7) == greedy


def test_eos_stops_a_row():
  dec = Decoder(*split(config("moe", True)), batch=3, max_len=30, prefill_chunk=8)
  prompts = [[1, 2, 3], [9, 8, 7, 6], [5]]
  free = [t.tolist() for t in dec.generate(prompts, 12).tokens]
  i = next(i for i, t in enumerate(free[0]) if t not in free[0][:i] and i >= 2)
  eos = free[0][i]
  out = [t.tolist() for t in dec.generate(prompts, 12, eos_id=eos).tokens]
  for row, full in zip(out, free):  # each row: its greedy tokens up to and including EOS
    assert row == (full[:full.index(eos) + 1] if eos in full else full)
  assert out[0][-1] == eos and len(out[0]) == i + 1


# ---------------------------------------------------------------------------------------
# The few-token MoE path against the loop reference.

def _experts(t, e=6, d=16, f=8, k=3, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (t, d))
  w = (0.3 * jax.random.normal(ks[1], (e, d, f)), 0.3 * jax.random.normal(ks[2], (e, d, f)),
       0.3 * jax.random.normal(ks[3], (e, f, d)))
  idx = jnp.asarray(np.stack([np.random.default_rng(seed + i).permutation(e)[:k] for i in range(t)]),
                    jnp.int32)
  gates = jax.random.uniform(ks[4], (t, k), minval=0.1, maxval=1.0)
  return x, w, idx, gates


@pytest.mark.parametrize("path", ["gathered", "all_experts", "backend_routed", "backend_experts"])
@pytest.mark.parametrize("t", [1, 5])
def test_few_token_paths_equal_the_loop_reference(path, t):
  x, w, idx, gates = _experts(t, seed=t)
  backend = registry.get("few_tokens")
  fn = {"gathered": lambda x, g: few_tokens.gathered_swiglu(x, idx, g, *w),
        "all_experts": lambda x, g: few_tokens.all_experts_swiglu(x, idx, g, *w),
        "backend_routed": lambda x, g: backend.routed(x, idx, g, w),
        "backend_experts": lambda x, g: backend.experts(x, sort_by_expert(idx, 6), g, w)}[path]
  ref = lambda x, g: loop_moe(x, idx, g, *w)
  np.testing.assert_allclose(fn(x, gates), ref(x, gates), rtol=1e-5, atol=1e-6)
  cot = jax.random.normal(jax.random.key(7), x.shape)
  grads = jax.grad(lambda x, g: jnp.sum(fn(x, g) * cot), argnums=(0, 1))(x, gates)
  grads_ref = jax.grad(lambda x, g: jnp.sum(ref(x, g) * cot), argnums=(0, 1))(x, gates)
  for a, b in zip(grads, grads_ref):  # the gates' gradient: each choice weighs its own expert
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_few_token_path_gathers_only_where_it_saves_bytes():
  big = jax.ShapeDtypeStruct((64, 2048, 1408), jnp.bfloat16)  # DeepSeekMoE-16B's experts
  assert few_tokens.picks_gather(8 * 6, big)        # batch 8: 48 of 64 experts
  assert not few_tokens.picks_gather(64, big)       # every expert is read anyway
  assert not few_tokens.picks_gather(7, jax.ShapeDtypeStruct((15, 128, 96), jnp.float32))  # tiny


# ---------------------------------------------------------------------------------------
# On a mesh: batch and heads split, experts over `expert`.

def test_decoding_on_a_mesh_equals_one_device():
  graphdef, params = split(config("moe", True))
  prompts = [[5, 9, 2, 7, 11], list(range(3, 15)), [8, 1], [4, 4, 4]]
  one = Decoder(graphdef, params, batch=4, max_len=24, prefill_chunk=8)
  mesh = make_mesh(MeshConfig("data:2,expert:2,tensor:2"))
  sharded = Decoder(graphdef, params, batch=4, max_len=24, mesh=mesh, prefill_chunk=8)
  tokens, lengths, _ = one.pad_prompts(prompts, 8)
  logits_one, _ = one.prefill_prompts(tokens, lengths)
  logits_mesh, cache = sharded.prefill_prompts(tokens, lengths)
  np.testing.assert_allclose(logits_mesh, logits_one, rtol=1e-5, atol=1e-5)
  spec = cache.keys[1].sharding.spec
  assert spec[1] == ("data", "expert") and spec[2] == "tensor"
  assert [t.tolist() for t in sharded.generate(prompts, 8).tokens] == \
         [t.tolist() for t in one.generate(prompts, 8).tokens]
  with pytest.raises(ValueError, match="decode batch=3 does not split"):
    Decoder(graphdef, params, batch=3, max_len=24, mesh=mesh)


# ---------------------------------------------------------------------------------------
# experiments.generate: a checkpoint directory through the script, a trained run in process.

def _word_tokenizer(path, vocab_size):
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders

  tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
  tok.save(path)


def test_generate_script_on_a_checkpoint_directory(tmp_path):
  torch = import_or_skip("torch", "torch")
  import_or_skip("transformers", "torch")
  from safetensors.numpy import save_file
  from tests import hub_fixtures as fx
  from tests.test_hf_parity import HF

  ref = fx.reference_model(HF, seed=4)
  lm_head = np.random.default_rng(4).normal(0, 0.3, (HF["vocab_size"], HF["hidden_size"])).astype(np.float32)
  save_file({k: np.ascontiguousarray(v) for k, v in fx.public_tensors(ref, lm_head).items()},
            str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(dict(HF, eos_token_id=1)))
  _word_tokenizer(str(tmp_path / "tokenizer.json"), HF["vocab_size"])
  out_json = tmp_path / "out.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.generate", f"--hf_checkpoint={tmp_path}",
       "--prompt=w5 w17 w40 w2", "--prompt=w9", "--max_new_tokens=6", "--dtype=float32",
       f"--json_out={out_json}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(out_json.read_text())
  assert out["prompt_ids"] == [[5, 17, 40, 2], [9]]  # no BOS: config.json names none
  assert out["prompts"] == ["w5 w17 w40 w2", "w9"]
  with torch.no_grad():
    for prompt, generated in zip(out["prompt_ids"], out["generated_ids"]):
      ids = list(prompt)
      while len(ids) < len(prompt) + 6 and (len(ids) == len(prompt) or ids[-1] != 1):
        h = ref(torch.tensor([ids])).last_hidden_state[0, -1].numpy()
        ids.append(int(np.argmax(lm_head @ h)))
      assert generated == ids[len(prompt):]
  assert out["texts"][0] == " ".join(f"w{i}" for i in out["generated_ids"][0] if i != 1)
  assert out["tokens_per_s"] > 0 and out["dtype"] == "float32"
  assert "tokens/s" in proc.stdout and out["texts"][1] in proc.stdout


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, small_corpus):
  from moe.train.config import TrainConfig
  from moe.train.loop import train_and_evaluate
  from tests.data_fixtures import small_data_config, small_model

  workdir = str(tmp_path_factory.mktemp("decode_run"))
  train_and_evaluate(workdir, small_model(), small_data_config(small_corpus, eval_batches=1),
                     TrainConfig(steps=4, warmup_steps=1, learning_rate=3e-3, log_every=4,
                                 eval_every=4, checkpoint_every=4, async_checkpoints=False))
  return workdir


def test_a_trained_run_continues_a_held_out_prompt(trained_run):
  from experiments import generation

  out = generation.sample_continuation(trained_run, n_tokens=12)
  assert len(out["generated_ids"][0]) == 12 and out["prompt_ids"][0]
  assert out["prompts"][0].startswith("def ")
  # The main job's seeded sample beside the greedy one: same prompt, reproducible, different.
  from moe.decode.sampling import Sampling
  hot = lambda seed: generation.sample_continuation(trained_run, 12, sampling=Sampling(temperature=1.0),
                                                    seed=seed)["generated_ids"][0]
  assert hot(0) == hot(0) and hot(0) != out["generated_ids"][0]
  loaded = generation.load_run(trained_run, dtype="bfloat16")
  assert loaded.cfg.dtype == "bfloat16"
  bf16 = generation.generate_text(loaded, ["def f(x):\n    return"], 6, warmup=False)
  assert len(bf16["generated_ids"][0]) <= 6 and bf16["dtype"] == "bfloat16"
