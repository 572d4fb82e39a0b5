"""Generation: jitted prefill and decoding of one model for a fixed (batch, max_len).

    prompts -> right-pad to [B, max_len] -> prefill C tokens at a time up to the longest
    prompt (each row's last prompt token's logits kept) -> one jitted while_loop: sample, stop rows at EOS,
    run the new tokens through the cache (1 token per row per step)

Prompts of any lengths, any number of new tokens and any sampling settings reuse the same
three executables (prefill chunk, decode step, decode loop): the chunk start, lengths,
token budget and sampling settings are traced values. Decode steps route MoE layers with
the `few_tokens` dispatch backend (few tokens: no sort, no expert-sized buffers); the
prefill keeps the model's own backend. On a mesh the parameters sit in their rules' shards,
the batch splits over the batch axes and the cache's heads over `tensor`.
"""

from __future__ import annotations

import collections
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe.decode import sampling
from moe.decode.forward import extend
from moe.decode.kv_cache import cache_shapes, cache_shardings, init_cache
from moe.model.config import ModelConfig
from moe.model.decoder import Transformer
from moe.parallel import rules
from moe.parallel.mesh import BATCH_AXES, use_mesh

STEP_BACKEND = "few_tokens"


class Generation(NamedTuple):
  tokens: list[np.ndarray]  # per prompt: the new tokens, up to and including EOS
  prefill_s: float          # wall time of the prefill (compilation included on a first call)
  decode_s: float           # wall time of the decode loop (likewise)

  @property
  def n_tokens(self) -> int:
    return sum(len(t) for t in self.tokens)


def graphdef_for(cfg: ModelConfig):
  """The graphdef of a Transformer of `cfg`, all variables in one state (nothing allocated)."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))[0]


class Decoder:
  """Prefill and decoding of `params` for `batch` rows of up to `max_len` tokens (prompt +
  new). `traces` counts how often each function was traced: once per Decoder."""

  def __init__(self, graphdef, params, batch: int, max_len: int, mesh: Mesh | None = None,
               prefill_chunk: int = 128, step_backend: str = STEP_BACKEND):
    self.cfg: ModelConfig = nnx.merge(graphdef, params).cfg
    self.batch, self.mesh = batch, mesh
    self.chunk, self.max_len = min(prefill_chunk, max_len), max_len
    rules.check_batch(mesh, batch, "decode batch")
    self.prefill_graphdef = graphdef
    self.step_graphdef = graphdef_for(self.cfg.replace(dispatch_backend=step_backend))
    self.traces = collections.Counter()
    dtype = jnp.dtype(self.cfg.dtype)
    shapes = cache_shapes(self.cfg, batch, self.max_len, dtype)
    if mesh is None:
      sh = dict(params=None, cache=None, batch=None, rep=None)
    else:
      sh = dict(params=rules.state_shardings(params, mesh), cache=cache_shardings(shapes, mesh),
                batch=NamedSharding(mesh, P(BATCH_AXES)), rep=rules.replicated(mesh))
    # Abstract parameters (ShapeDtypeStructs: moe.train.inference_plan lowers the jitted
    # functions below for a TPU slice) are not placed.
    abstract = all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(params))
    self.params = params if mesh is None or abstract else jax.device_put(params, sh["params"])
    jit = lambda fn, ins, outs, donate=(): jax.jit(
        fn, in_shardings=None if mesh is None else tuple(sh[i] for i in ins),
        out_shardings=None if mesh is None else tuple(sh[o] for o in outs), donate_argnums=donate)
    # A fresh cache and the prefill's zero logits [B, V], made where the prefill leaves them
    # (so that every prefill call sees the same argument types and hits one compiled entry).
    fresh = lambda: (init_cache(self.cfg, batch, self.max_len, dtype),
                     jnp.zeros((batch, self.cfg.vocab_size), jnp.float32))
    self.new_state = jax.jit(fresh, out_shardings=None if mesh is None else (sh["cache"], sh["batch"]))
    self.prefill = jit(self._prefill, ("params", "cache", "batch", "rep", "batch", "batch"),
                       ("batch", "cache"), donate=(1,))
    self.step = jit(self._step, ("params", "cache", "batch", "batch"), ("batch", "cache"), donate=(1,))
    self.decode = jit(self._decode, ("params", "cache", "batch", "batch", "batch", "rep", "rep",
                                     "rep", "rep"), ("batch", "batch", "cache"), donate=(1,))

  # --- the jitted functions (their Python bodies run only when traced) ---

  def _prefill(self, params, cache, tokens, start, lengths, logits):
    """tokens: [B, C], the prompts' slots start .. start + C - 1; lengths: [B] prompt lengths;
    logits: [B, V] so far -> (logits at each row's last prompt token once this chunk holds
    it, cache)."""
    self.traces["prefill"] += 1
    with use_mesh(self.mesh):
      model = nnx.merge(self.prefill_graphdef, params)
      b, c = tokens.shape
      h, cache = extend(model, cache, tokens, jnp.full((b,), start, jnp.int32))
      last = lengths - 1 - start  # the row's last prompt token, within this chunk
      h_last = jnp.take_along_axis(h, jnp.clip(last, 0, c - 1)[:, None, None], axis=1)[:, 0]
      inside = (last >= 0) & (last < c)
      return jnp.where(inside[:, None], model.logits(h_last), logits), cache

  def _step(self, params, cache, tokens, positions):
    """tokens, positions: [B] -> (next-token logits [B, V], cache): one token per row."""
    self.traces["step"] += 1
    return self._one_token(params, cache, tokens, positions)

  def _one_token(self, params, cache, tokens, positions):
    with use_mesh(self.mesh):
      model = nnx.merge(self.step_graphdef, params)
      h, cache = extend(model, cache, tokens[:, None], positions)
      return model.logits(h[:, 0]), cache

  def _decode(self, params, cache, logits, lengths, done, key, max_new, eos_id, s):
    """From the prefill's logits [B, V]: up to max_new tokens per row; a row stops after
    EOS (then emits EOS) -> (tokens [B, max_len], new tokens per row [B], cache)."""
    self.traces["decode"] += 1
    b = logits.shape[0]
    pick = lambda logits, i: sampling.sample(logits, jax.random.fold_in(key, i), s)

    def emit(carry, i, tok):
      out, n, done = carry
      tok = jnp.where(done, eos_id, tok)
      return out.at[:, i].set(tok), n + (~done).astype(jnp.int32), done | (tok == eos_id), tok

    out, n, done, tok = emit((jnp.full((b, self.max_len), eos_id, jnp.int32),
                              jnp.zeros((b,), jnp.int32), done), 0, pick(logits, 0))

    def body(state):
      i, tok, out, n, done, cache = state
      logits, cache = self._one_token(params, cache, tok, lengths + i - 1)  # tok sits at position L + i - 1
      out, n, done, tok = emit((out, n, done), i, pick(logits, i))
      return i + 1, tok, out, n, done, cache

    cond = lambda state: (state[0] < max_new) & ~jnp.all(state[4])
    _, _, out, n, _, cache = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, out, n, done, cache))
    return out, n, cache

  # --- the host side ---

  def pad_prompts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int):
    """-> (tokens [batch, max_len] right-padded, lengths [batch], active rows [batch])."""
    lengths = [len(p) for p in prompts]
    if not prompts or len(prompts) > self.batch:
      raise ValueError(f"{len(prompts)} prompts for a decoder of batch {self.batch}")
    if min(lengths) < 1:
      raise ValueError("every prompt needs at least one token")
    if max(lengths) + max_new_tokens > self.max_len:
      raise ValueError(f"prompt of {max(lengths)} tokens + {max_new_tokens} new tokens exceed the "
                       f"decoder's max_len={self.max_len}")
    tokens = np.zeros((self.batch, self.max_len), np.int32)
    rows = list(prompts) + [prompts[0]] * (self.batch - len(prompts))  # filler rows, ignored
    for i, p in enumerate(rows):
      tokens[i, :len(p)] = np.asarray(p, np.int32)
    active = np.arange(self.batch) < len(prompts)
    return tokens, np.asarray([len(p) for p in rows], np.int32), active

  def prefill_prompts(self, tokens: np.ndarray, lengths: np.ndarray):
    """Padded prompts [batch, max_len] -> (last-token logits [batch, V], fresh cache): chunks
    of C tokens up to the longest prompt; a last chunk that would pass max_len starts
    earlier instead, recomputing a few slots (to the same values)."""
    cache, logits = self.new_state()
    for start in range(0, int(lengths.max()), self.chunk):
      start = min(start, self.max_len - self.chunk)
      logits, cache = self.prefill(self.params, cache, tokens[:, start:start + self.chunk],
                                   np.int32(start), lengths, logits)
    return logits, cache

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               sampling_cfg: sampling.Sampling = sampling.Sampling(), seed: int = 0,
               eos_id: int | None = None) -> Generation:
    """New tokens for each prompt (lists of token ids), up to max_new_tokens or EOS."""
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    tokens, lengths, active = self.pad_prompts(prompts, max_new_tokens)
    t0 = time.perf_counter()
    logits, cache = self.prefill_prompts(tokens, lengths)
    jax.block_until_ready(logits)
    t1 = time.perf_counter()
    out, n, _ = self.decode(self.params, cache, logits, lengths, ~active, jax.random.key(seed),
                            np.int32(max_new_tokens), np.int32(-1 if eos_id is None else eos_id),
                            sampling_cfg.arrays())
    out, n = np.asarray(out), np.asarray(n)
    t2 = time.perf_counter()
    return Generation([out[i, :n[i]] for i in range(len(prompts))], t1 - t0, t2 - t1)
