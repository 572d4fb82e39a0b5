"""This model's parameters written in the released format: size-capped `*.safetensors`
shards in bf16 or f32, `model.safetensors.index.json` and `config.json` (tokenizer files
are the caller's: moe.train.export).

Tensors go out in layer order, one layer's slice of each stacked parameter fetched at a
time, and a shard is written as soon as it is full: the host holds one shard plus one
layer's slice of a parameter. Single-process: each slice is gathered whole onto this host.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from moe.hub.hf_config import CheckpointFormatError, config_to_hf
from moe.hub.hf_weights import Source, sources
from moe.hub.safetensors_import import CONFIG, INDEX, SINGLE
from moe.model.config import ModelConfig
from moe.model.decoder import layer_runs

NP_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def public_tensors(cfg: ModelConfig, params: Any) -> Iterator[tuple[str, np.ndarray]]:
  """(public name, host array) of every tensor, in layer order: the embedding, each layer's
  tensors, the final norm and the LM head."""
  values = {path: var.get_value() for path, var in nnx.to_flat_state(params)}
  srcs = sources(cfg)

  def whole(path):
    yield from srcs[path].public(np.asarray(jax.device_get(values[path]))).items()

  yield from whole(("embed",))
  for s, (_, count) in enumerate(layer_runs(cfg)):
    stack = sorted(p for p in srcs if p[:2] == ("stacks", s))
    for i in range(count):
      layer = {}
      for path in stack:
        src = srcs[path]
        one = Source(src.names[i, ...], src.tail, src.split, src.transpose)
        layer.update(one.public(np.asarray(jax.device_get(values[path][i]))))
      yield from sorted(layer.items())
  yield from whole(("final_norm", "scale"))
  yield from whole(("lm_head",))


def _shard_name(i: int, n: int) -> str:
  return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def export_checkpoint(out_dir: str, cfg: ModelConfig, params: Any, dtype: str = "bfloat16",
                      max_shard_bytes: int = 4 << 30, bos_id: int | None = None,
                      eos_id: int | None = None, pad_id: int | None = None) -> list[str]:
  """Write `params` (an nnx.State of the model's Params, on any mesh) of a model of `cfg` to
  out_dir (new or empty) -> the files written. One shard: `model.safetensors`; more: HF's
  `model-0000i-of-0000n.safetensors` names and the index."""
  if dtype not in NP_DTYPES:
    raise ValueError(f"dtype={dtype!r}: choose from {sorted(NP_DTYPES)}")
  hf = config_to_hf(cfg, dtype, bos_id, eos_id, pad_id)  # refuses before anything is written
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise CheckpointFormatError(f"{out_dir} is not empty ({sorted(os.listdir(out_dir))[:3]}...); "
                                f"export into a new directory")
  os.makedirs(out_dir, exist_ok=True)
  shards: list[list[str]] = []
  buffer: dict[str, np.ndarray] = {}
  size = total = 0

  def flush():
    nonlocal buffer, size
    if buffer:
      save_file(buffer, os.path.join(out_dir, f"shard-{len(shards)}.tmp"), metadata={"format": "pt"})
      shards.append(sorted(buffer))
      buffer, size = {}, 0

  for name, t in public_tensors(cfg, params):
    t = t.astype(NP_DTYPES[dtype])
    if buffer and size + t.nbytes > max_shard_bytes:
      flush()
    buffer[name] = t
    size += t.nbytes
    total += t.nbytes
  flush()
  names = [SINGLE] if len(shards) == 1 else [_shard_name(i, len(shards)) for i in range(len(shards))]
  for i, name in enumerate(names):
    os.replace(os.path.join(out_dir, f"shard-{i}.tmp"), os.path.join(out_dir, name))
    os.chmod(os.path.join(out_dir, name), 0o644)  # safetensors writes 0600
  if len(shards) > 1:
    weight_map = {t: names[i] for i, shard in enumerate(shards) for t in shard}
    with open(os.path.join(out_dir, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                f, indent=2)
    names.append(INDEX)
  with open(os.path.join(out_dir, CONFIG), "w") as f:
    json.dump(hf, f, indent=2)
  return names + [CONFIG]
