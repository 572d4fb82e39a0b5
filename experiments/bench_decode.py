"""Decode speed: KV-cache decoding (moe.decode) against recomputing the whole sequence for
every new token, greedy, random initialisation; then the released-format import's
throughput. Prints markdown tables.

  python -m experiments.bench_decode [--preset=tiny_deepseekmoe --batch_size=1 --batch_size=8
                                      --max_new_tokens=256]
                                     [--import_preset=deepseekmoe_16b --import_layers=2]

Both run as one compiled loop over fixed shapes [batch, max_len] (max_len = prompt + new
tokens), so every recomputation step is the same full forward pass over [batch, max_len]:
it is timed over --recompute_tokens steps (its tokens/s does not depend on how many).
Compilation and the prefill are not timed; each time is the median of --reps runs.

Import: a randomly initialised --import_preset cut to --import_layers layers is exported
in bf16 (moe.hub.safetensors_export, 1 GiB shards) to a temporary directory and read back
with moe.hub.safetensors_import.import_checkpoint onto one device, in bf16 and in f32;
MB/s is the files' bytes over the wall time (config parsing and header checks included,
first read after writing: the page cache may hold the files).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from experiments import common_flags, errors, gin_flags
from experiments.timing import median_of
from moe.cache import enable_compile_cache
from moe.decode.generate import Decoder
from moe.hub.safetensors_export import export_checkpoint
from moe.hub.safetensors_import import import_checkpoint
from moe.model.decoder import Transformer
from moe.model.config import ModelConfig
from moe.model.presets import get_preset, model_config

_PRESET = common_flags.preset()  # random initialisation
_BATCHES = common_flags.batch_size(multiple=True)  # default: 1 and 8
_NEW = common_flags.max_new_tokens()
_PROMPT = flags.DEFINE_integer("prompt_len", 16, "prompt tokens per row")
_DTYPE = common_flags.dtype()  # default float32 (CPU)
_RECOMPUTE = flags.DEFINE_integer("recompute_tokens", 64, "new tokens timed without the cache")
_REPS = common_flags.reps()
_IMPORT_PRESET = flags.DEFINE_string("import_preset", "deepseekmoe_16b", "preset written and "
                                     "imported (random init); empty: skip the import table")
_IMPORT_LAYERS = flags.DEFINE_integer("import_layers", 2, "layers of --import_preset kept "
                                      "(2: the 16B's dense first layer and one MoE layer)")


def recompute_loop(graphdef):
  """Greedy decoding without a cache: the full model over [B, max_len] for every token."""
  @jax.jit
  def run(params, tokens, lengths, n_new):
    model = nnx.merge(graphdef, params)
    rows = jnp.arange(tokens.shape[0])

    def body(_, state):
      tokens, lengths = state
      logits, _ = model(tokens)
      nxt = jnp.argmax(logits[rows, lengths - 1], axis=-1).astype(jnp.int32)
      return tokens.at[rows, lengths].set(nxt), lengths + 1

    return jax.lax.fori_loop(0, n_new, body, (tokens, lengths))[0]
  return run


def bench(cfg: ModelConfig, batch: int, n_new: int, prompt_len: int, n_recompute: int,
          reps: int) -> dict:
  graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
  prompts = np.random.default_rng(batch).integers(3, cfg.vocab_size, (batch, prompt_len)).tolist()
  decoder = Decoder(graphdef, params, batch, prompt_len + n_new)
  decoder.generate(prompts, 2)  # compile
  runs = [decoder.generate(prompts, n_new) for _ in range(reps)]
  decode_s = statistics.median(r.decode_s for r in runs)
  cached = np.stack(runs[-1].tokens)

  run = recompute_loop(graphdef)
  tokens = np.zeros((batch, decoder.max_len), np.int32)
  tokens[:, :prompt_len] = prompts
  lengths = np.full((batch,), prompt_len, np.int32)
  jax.block_until_ready(run(params, tokens, lengths, np.int32(1)))  # compile
  recompute_s, full = median_of(reps, lambda: np.asarray(run(params, tokens, lengths, np.int32(n_recompute))))
  full = full[:, prompt_len:prompt_len + n_recompute]
  cached_tps, full_tps = batch * n_new / decode_s, batch * n_recompute / recompute_s
  return {"batch": batch, "max_len": decoder.max_len, "cached_tokens_per_s": cached_tps,
          "recompute_tokens_per_s": full_tps, "speedup": cached_tps / full_tps,
          "prefill_s": min(r.prefill_s for r in runs),
          "same_tokens": float(np.mean(cached[:, :n_recompute] == full))}


def bench_import(preset: str, n_layers: int, reps: int) -> list[dict]:
  """Export a random `preset` (n_layers layers) in bf16, then time importing it."""
  cfg = get_preset(preset).replace(n_layers=n_layers, param_dtype="bfloat16", dtype="bfloat16")
  params = nnx.state(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
  directory = tempfile.mkdtemp(prefix="bench_import_")
  try:
    files = export_checkpoint(directory, cfg, params, "bfloat16", max_shard_bytes=1 << 30)
    del params
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in files)
    rows = []
    for dtype in ("bfloat16", "float32"):
      def load():
        out = import_checkpoint(directory, None, dtype).params
        jax.block_until_ready(jax.tree.leaves(out))
      seconds, _ = median_of(reps, load)
      rows.append({"dtype": dtype, "files": len(files), "mb": size / 1e6, "seconds": seconds,
                   "mb_per_s": size / 1e6 / seconds})
    return rows
  finally:
    shutil.rmtree(directory)


def main(argv):
  gin_flags.parse(argv)
  enable_compile_cache()
  cfg = model_config().replace(dtype=_DTYPE.value or "float32")
  if _NEW.value == 0:
    raise app.UsageError("--max_new_tokens=0: nothing to time")
  print(f"{cfg.name}, {cfg.dtype}, prompt {_PROMPT.value} tokens, {_NEW.value} new tokens "
        f"(recomputation timed over {min(_RECOMPUTE.value, _NEW.value)}), greedy; "
        f"{jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs")
  print("| batch | max_len | KV cache tokens/s | recompute tokens/s | speedup | prefill s | same tokens |")
  print("|---|---|---|---|---|---|---|")
  for b in _BATCHES.value or [1, 8]:
    r = bench(cfg, b, _NEW.value, _PROMPT.value, min(_RECOMPUTE.value, _NEW.value), _REPS.value)
    print(f"| {r['batch']} | {r['max_len']} | {r['cached_tokens_per_s']:.1f} | "
          f"{r['recompute_tokens_per_s']:.1f} | {r['speedup']:.1f}x | {r['prefill_s']:.3f} | "
          f"{r['same_tokens']:.0%} |", flush=True)
  if _IMPORT_PRESET.value:
    print(f"\nimport of {_IMPORT_PRESET.value} cut to {_IMPORT_LAYERS.value} layers, stored bf16, "
          f"one device, median of {_REPS.value}")
    print("| into | files | MB on disk | seconds | MB/s |")
    print("|---|---|---|---|---|")
    for r in bench_import(_IMPORT_PRESET.value, _IMPORT_LAYERS.value, _REPS.value):
      print(f"| {r['dtype']} | {r['files']} | {r['mb']:.0f} | {r['seconds']:.2f} | "
            f"{r['mb_per_s']:.0f} |", flush=True)


if __name__ == "__main__":
  errors.run(main, flags_parser=gin_flags.flags_parser)
