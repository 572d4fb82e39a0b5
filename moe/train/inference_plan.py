"""Ahead-of-time plan of serving a model on a TPU slice: its inference programs compiled by
the TPU compiler from abstract shapes (nothing is allocated), parameters in bf16, and what
each chip would hold and spend (docs/decode.md has 16B's table).

    score        moe.train.lm_eval's scorer (`_score`: what `score_rows`, and through
                 moe.train.harness lm-eval's log-likelihood requests, run): [B, L] rows
    prefill      moe.decode.Decoder.prefill: one chunk of C prompt tokens per row written
                 into the [B, max_len] KV cache (a P-token prompt takes ceil(P / C) calls)
    decode_step  moe.decode.Decoder.step: one new token per row over the cache

    mesh = slice_mesh(cfg, 'v5e:2x4')                 # serving_mesh's layout of the slice
    programs = compile_programs(cfg, mesh, 'v5e', batch=64)

Parameters: the model built abstractly (nnx.eval_shape) with `param_dtype` and `dtype`
bfloat16 (`serving_config`, as moe.hub's import_checkpoint builds a served checkpoint),
each a jax.ShapeDtypeStruct carrying its NamedSharding under the rules on a Mesh of the
slice's abstract devices (moe.parallel.topology, all chips on one host).

The mesh (`serving_mesh`): nothing else picks one for inference (moe.train.mesh_search
ranks training layouts), so this is a written rule: routed experts over the most chips that
divide them (`expert`), heads and widths over the rest (`tensor`), no data or fsdp axis:
every weight is read where it lies, and the batch splits over the expert axis.

Time per call and chip, estimates all: `estimated_seconds` is moe.parallel.compiled_cost's
reading of the compiled module (loops times their trip counts, data-dependent ones once);
`optimal_seconds` is compiled.cost_analysis()'s own, which counts every loop body once and
goes negative with SparseCore-offloaded scatters. The decode step's `hbm_bound_seconds`:
the chip's shards of the weights its batch activates (uniform routing) and of the whole
cache (the masked attention reads every slot), read once at the HBM bandwidth.
"""

from __future__ import annotations

import inspect
import math
import re
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe.decode.generate import STEP_BACKEND, Decoder
from moe.decode.kv_cache import cache_shapes, cache_shardings
from moe.dispatch import registry, tiled_gmm
from moe.model.config import ModelConfig
from moe.model.decoder import Transformer
from moe.parallel import compiled_cost, rules, topology
from moe.parallel.mesh import BATCH_AXES, MeshConfig, make_mesh
from moe.train import lm_eval
from moe.train.plan import per_device_bytes, shard_bytes

PROGRAMS = ("score", "prefill", "decode_step")
PREFILL_CHUNK = inspect.signature(Decoder).parameters["prefill_chunk"].default
COMPONENTS = ("attention", "router", "dispatch", "routed_experts", "shared_experts", "dense_ffn",
              "lm_head_loss", "embedding")
KERNELS = ("gmm", "tgmm", "gather_rows", "combine_rows", "splash")
MAX_BATCH = 4096  # largest_batch searches no further
_MOSAIC = re.compile(r'%(\S+) = [^\n]*custom_call_target="tpu_custom_call"')


class Refused(Exception):
  """The TPU compiler refused a program (it does not fit the chip's memory)."""


class Program(NamedTuple):
  """One compiled inference program, per chip."""
  name: str
  batch: int
  tokens: int               # per row per call: L (score), C (prefill), 1 (decode_step)
  param_bytes: int          # the parameters' shards (from their shardings)
  cache_bytes: int          # the KV cache's shard (0: score)
  argument_bytes: int       # compiled: every input
  temp_bytes: int           # compiled temporaries
  peak_bytes: int           # arguments + temporaries + outputs not aliased to inputs
  estimated_seconds: float  # compiled_cost's estimate of one call
  optimal_seconds: float    # cost_analysis()['optimal_seconds'] (loop bodies once)
  seconds: dict             # component -> estimated seconds
  kernels: dict             # Mosaic kernel -> calls in the program
  collectives: dict         # "kind sync|async" -> count per call
  compile_seconds: float
  hbm_bound_seconds: float = 0.0  # decode_step: (weights read + cache) / HBM bandwidth
  expert_read_bytes: float = 0.0  # decode_step: routed-expert weights read (uniform routing)
  alias_bytes: int = 0            # compiled: outputs written in place of (donated) inputs


def serving_config(cfg: ModelConfig) -> ModelConfig:
  """bf16 parameters and compute, as a served checkpoint is imported."""
  return cfg.replace(dtype="bfloat16", param_dtype="bfloat16")


def serving_mesh(cfg: ModelConfig, n_chips: int) -> str:
  """The rule: experts over the most chips that divide them, `tensor` over the rest."""
  expert = math.gcd(n_chips, cfg.n_routed_experts) if cfg.is_moe_model else 1
  return f"expert:{expert},tensor:{n_chips // expert}"


batch_unit = lm_eval.batch_rows  # the smallest batch that splits over a mesh's batch axes


def slice_mesh(cfg: ModelConfig, slice_name: str, mesh_spec: str | None = None) -> Mesh:
  """`mesh_spec` (default: serving_mesh's) over the slice's abstract chips, one host."""
  devices = topology.tpu_devices(slice_name, one_host=True)
  return make_mesh(MeshConfig(mesh_spec or serving_mesh(cfg, len(devices))), devices)


def _sds(shapes, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def kernels(text: str) -> dict[str, int]:
  """Mosaic calls in compiled HLO text by kernel (their names carry the jitted function's)."""
  names = _MOSAIC.findall(text)
  n = {k: sum(k in m and not (k == "gmm" and "tgmm" in m) for m in names) for k in KERNELS}
  return {k: c for k, c in n.items() if c}


def decode_read_bytes(cfg: ModelConfig, params, shardings, batch: int) -> tuple[float, float]:
  """(routed-expert bytes, other weight bytes) a chip reads in a decode step of `batch`
  rows: its shard of every weight, the routed experts' times the expected share of a
  layer's experts some token of the batch chooses under uniform routing,
  1 - (1 - K'/N')^B; of the embedding table only B rows (counted as 0)."""
  hit = 1 - (1 - cfg.n_activated_experts / cfg.n_routed_experts) ** batch if cfg.is_moe_model else 0
  experts = other = 0.0
  leaves = jax.tree_util.tree_leaves_with_path(params)
  for (path, a), s in zip(leaves, jax.tree.leaves(shardings)):
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    if "experts" in names:
      experts += shard_bytes(a, s) * hit
    elif names[0] != "embed":
      other += shard_bytes(a, s)
  return experts, other


def decode_dispatch(mesh: Mesh | None) -> str:
  """What a decode step's MoE layers run (Decoder's step backend; on a mesh, expert
  parallelism's rounds, which multiply with the backend's gmm)."""
  backend = registry.get(STEP_BACKEND)
  if mesh is None:
    return f"{STEP_BACKEND}: per-choice gathered weights or all experts (moe.dispatch.few_tokens)"
  gmm = "tiled_gmm (XLA loops over each local expert's row tiles)" if backend.gmm is tiled_gmm.gmm \
      else getattr(backend.gmm, "__name__", repr(backend.gmm))
  return (f"{STEP_BACKEND} under expert parallelism (expert:{mesh.shape['expert']}): dropless "
          f"rounds (all_to_all), rows sorted by local expert, the backend's gmm = {gmm}")


def _compile(lower: Callable):
  start = time.perf_counter()
  try:
    compiled = lower().compile()
  except Exception as e:  # the TPU compiler's out-of-memory refusal; anything else is a bug
    if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
      raise
    raise Refused(" ".join(str(e).split())[:300]) from None
  return compiled, time.perf_counter() - start


def _measure(name, compiled, seconds, cfg, mesh, generation, batch, tokens, param_bytes,
             cache_bytes) -> Program:
  mem = compiled.memory_analysis()
  text = compiled.as_text()
  cost = compiled_cost.estimate(text, generation, compiled_cost.scope_component(COMPONENTS))
  secs = dict(cost.seconds)
  if any("kernel without estimate in attention" in k for k in cost.unestimated):
    # Splash's kernels carry no estimate: their forward score and value matmuls (4 L d S
    # per token, half of it under the causal mask) at the chip's peak, a floor.
    flops = 2 * cfg.n_layers * cfg.d_model * tokens * batch * tokens / mesh.size
    secs["attention kernels (at peak)"] = flops / compiled_cost.PEAK_FLOPS[generation]
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  args, temp = int(mem.argument_size_in_bytes), int(mem.temp_size_in_bytes)
  out_new = int(mem.output_size_in_bytes) - int(mem.alias_size_in_bytes)
  return Program(name, batch, tokens, param_bytes, cache_bytes, args, temp,
                 args + temp + max(out_new, 0), sum(secs.values()),
                 float((ca or {}).get("optimal_seconds", float("nan"))), secs, kernels(text),
                 {f"{k} {mode}": n for (k, mode), n in sorted(cost.collectives.items())}, seconds,
                 alias_bytes=int(mem.alias_size_in_bytes))


def compile_programs(cfg: ModelConfig, mesh: Mesh, generation: str, batch: int,
                     seq_len: int = 2048, max_len: int | None = None, chunk: int = PREFILL_CHUNK,
                     which: tuple[str, ...] = PROGRAMS) -> list[Program]:
  """`which` of PROGRAMS for `batch` rows, compiled for `mesh`'s `generation` TPU chips
  from abstract shapes in bf16: scoring rows of seq_len tokens; prefill chunks of `chunk`
  tokens and the decode step over a cache of max_len positions (default max_seq_len).
  Raises Refused where the compiler finds a program too big for the chip."""
  cfg = serving_config(cfg)
  max_len = max_len or cfg.max_seq_len
  rules.check_batch(mesh, batch, "batch")
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  shardings = rules.state_shardings(params, mesh)
  p_in, param_bytes = _sds(params, shardings), per_device_bytes(params, shardings)
  rows, rep = NamedSharding(mesh, P(BATCH_AXES)), rules.replicated(mesh)
  i32 = lambda shape, sh: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh)
  out = []
  measure = lambda name, lower, tokens, cache_bytes: _measure(
      name, *_compile(lower), cfg, mesh, generation, batch, tokens, param_bytes, cache_bytes)
  if "score" in which:
    bsh = rules.batch_sharding(mesh)
    b = {k: jax.ShapeDtypeStruct((batch, seq_len), jnp.float32 if k == "weights" else jnp.int32,
                                 sharding=bsh)
         for k in ("inputs", "targets", "weights", "segment_ids", "positions")}
    out.append(measure("score", lambda: lm_eval._scorer(graphdef, mesh).lower(p_in, b), seq_len, 0))
  if "prefill" in which or "decode_step" in which:
    dec = Decoder(graphdef, p_in, batch, max_len, mesh, prefill_chunk=chunk)
    shapes = cache_shapes(cfg, batch, max_len, jnp.dtype(cfg.dtype))
    csh = cache_shardings(shapes, mesh)
    cache, cache_bytes = _sds(shapes, csh), per_device_bytes(shapes, csh)
    if "prefill" in which:
      logits = jax.ShapeDtypeStruct((batch, cfg.vocab_size), jnp.float32, sharding=rows)
      out.append(measure("prefill", lambda: dec.prefill.lower(
          p_in, cache, i32((batch, dec.chunk), rows), i32((), rep), i32((batch,), rows), logits),
          dec.chunk, cache_bytes))
    if "decode_step" in which:
      step = measure("decode_step", lambda: dec.step.lower(p_in, cache, i32((batch,), rows),
                                                           i32((batch,), rows)), 1, cache_bytes)
      experts, other = decode_read_bytes(cfg, params, shardings, batch)
      bound = (experts + other + cache_bytes) / compiled_cost.HBM_BYTES_PER_S[generation]
      out.append(step._replace(hbm_bound_seconds=bound, expert_read_bytes=experts))
  return out


class Fit(NamedTuple):
  batch: int      # the largest batch found whose programs compile and fit (0: none)
  compiled: dict  # batch -> its programs, or why the compiler refused them
  limit: float    # the bytes per chip a program's peak had to stay under


def compiler_capacity(refusal: str) -> float | None:
  """The HBM bytes the compiler said it has, from its refusal: "Used 31.26G of 31.25G hbm"
  (v6e), "exceeds available HBM (95.74G)" (v5p)."""
  m = re.search(r"Used [\d.]+[GM] of ([\d.]+)G hbm|available HBM \(([\d.]+)G\)", refusal)
  return float(m.group(1) or m.group(2)) * 2**30 if m else None


def largest_batch(compile_at: Callable[[int], list[Program]], unit: int, hbm_bytes: float,
                  tries: int = 4, max_batch: int = MAX_BATCH) -> Fit:
  """The largest multiple of `unit` whose programs (`compile_at(batch)`) all compile and
  fit `hbm_bytes` per chip: compiled at unit and 2 unit, each program's peak extrapolated
  linearly in the batch to the HBM, that batch compiled to check it. One that does not fit
  moves the estimate: re-extrapolated from its peaks, or, where the compiler refused it,
  to the HBM the refusal names (less than the chip's: the compiler reserves some), else
  halfway back."""
  seen: dict[int, list[Program] | str] = {}
  limit = hbm_bytes

  def fits(b: int) -> bool:
    if b not in seen:
      try:
        seen[b] = compile_at(b)
      except Refused as e:
        seen[b] = f"refused by the compiler: {e}"
    return not isinstance(seen[b], str) and all(p.peak_bytes <= limit for p in seen[b])

  if not fits(unit):
    return Fit(0, seen, limit)
  if not fits(2 * unit):
    return Fit(unit, seen, limit)
  best, ref = 2 * unit, unit

  def extrapolate(b: int) -> int:
    n = max_batch
    for l, h in zip(seen[ref], seen[b]):
      slope = (h.peak_bytes - l.peak_bytes) / (b - ref)
      if slope > 0:
        n = min(n, ref + (limit - l.peak_bytes) / slope)
    return int(n // unit) * unit

  b = extrapolate(best)
  for _ in range(tries):
    if b <= best:
      break
    if fits(b):  # extrapolated again from here: a closer slope may allow more
      best = b
      b = extrapolate(b)
      continue
    over, why = b, seen[b]
    if not isinstance(why, str):
      b = extrapolate(over)
    elif compiler_capacity(why):
      limit = min(limit, compiler_capacity(why))
      b = extrapolate(best)
    else:
      b = (best + over) // 2 // unit * unit
    b = min(b, over - unit)
  return Fit(best, seen, limit)
