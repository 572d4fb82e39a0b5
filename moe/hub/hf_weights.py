"""The public DeepSeek-MoE checkpoint's tensors (HF naming, torch [out, in] layout) <-> this
model's parameters, one `Source` per parameter: which public tensors make it and how.

    sources(cfg)[('stacks', 1, 'blocks', 'ffn', 'experts', 'w_gate')]
      names  [27, 64]: 'model.layers.{1+l}.mlp.experts.{e}.gate_proj.weight', each [1408, 2048]
      tail   (2048, 1408): the transposed tensor, split=1 (rows: embed; columns: expert_mlp)

A Source reads any slice of its parameter (`Source.read`) touching only the public tensors,
rows and columns that slice needs: the sharded import (moe.hub.safetensors_import) builds
each device's shard that way. `load_public_checkpoint` takes an in-memory {name: array}.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe.hub.hf_config import CheckpointFormatError
from moe.model.config import ModelConfig
from moe.model.decoder import Transformer, layer_runs

Path = tuple[Any, ...]
# read(name, rows[, cols]) -> that block of a public tensor (a copy, in its stored dtype)
Read = Callable[..., np.ndarray]


def _range(s: slice, n: int) -> slice:
  start, stop, step = s.indices(n)
  assert step == 1, s  # shards are contiguous blocks
  return slice(start, stop)


def _group(index: tuple[slice, ...], dims: tuple[int, ...]):
  """A slice of some dims that a matrix side flattens -> (flat range, block shape, slice of
  that block). A range of the first dim with the rest whole is one contiguous flat range
  (what the rules produce: head_dim is never split); anything else reads the side whole."""
  if all(s == slice(0, n) for s, n in zip(index[1:], dims[1:])):
    inner = math.prod(dims[1:])
    return (slice(index[0].start * inner, index[0].stop * inner),
            (index[0].stop - index[0].start,) + dims[1:], (slice(None),) * len(dims))
  return slice(0, math.prod(dims)), dims, index


def aligned_empty(shape: tuple[int, ...], dtype, align: int = 64) -> np.ndarray:
  """np.empty on a 64-byte boundary: the CPU backend then adopts the buffer as the device
  array without copying it (device memory is host memory there)."""
  n = math.prod(shape) * np.dtype(dtype).itemsize
  raw = np.empty(n + align, np.uint8)
  start = -raw.ctypes.data % align
  return raw[start:start + n].view(dtype).reshape(shape)


class Source(NamedTuple):
  """One parameter [*names.shape, *tail] made of public tensors: `names` (an object array
  over the stacked axes: layers, then routed experts) each 1-D [d] or a matrix that is
  transposed if `transpose` and reshaped to `tail`, whose first `split` dims are its rows."""
  names: np.ndarray
  tail: tuple[int, ...]
  split: int
  transpose: bool

  @property
  def shape(self) -> tuple[int, ...]:
    return self.names.shape + self.tail

  @property
  def public_shape(self) -> tuple[int, ...]:
    if len(self.tail) == 1:
      return self.tail
    rows, cols = math.prod(self.tail[:self.split]), math.prod(self.tail[self.split:])
    return (cols, rows) if self.transpose else (rows, cols)

  def read(self, read: Read, index: tuple[slice, ...], dtype) -> np.ndarray:
    """The block `index` (one slice per dim) of the parameter, in `dtype`; reads only the
    public tensors and rows/columns it covers, one tensor at a time."""
    index = tuple(_range(s, n) for s, n in zip(index, self.shape))
    k = self.names.ndim
    names = self.names[index[:k] + (Ellipsis,)]  # stays an array (0-d: one tensor)
    out = aligned_empty(tuple(s.stop - s.start for s in index), dtype)
    tail = index[k:]
    if len(self.tail) == 1:
      for i in np.ndindex(names.shape):
        out[i] = read(names[i], tail[0])
      return out
    rows, row_shape, row_post = _group(tail[:self.split], self.tail[:self.split])
    cols, col_shape, col_post = _group(tail[self.split:], self.tail[self.split:])
    for i in np.ndindex(names.shape):
      block = read(names[i], cols, rows).T if self.transpose else read(names[i], rows, cols)
      out[i] = block.reshape(row_shape + col_shape)[row_post + col_post]
    return out

  def public(self, value: np.ndarray) -> dict[str, np.ndarray]:
    """The whole parameter `value` [*shape] -> its public tensors {name: array}."""
    out = {}
    for i in np.ndindex(self.names.shape):
      t = value[i]
      if len(self.tail) > 1:
        t = t.reshape(self.public_shape[::-1] if self.transpose else self.public_shape)
        t = t.T if self.transpose else t
      out[self.names[i]] = np.ascontiguousarray(t)
    return out


def _names(fmt: str, layers: range, experts: int = 0) -> np.ndarray:
  """fmt with {l} (and {e}) -> names [len(layers)] (or [len(layers), experts])."""
  if not experts:
    return np.array([fmt.format(l=l) for l in layers], dtype=object)
  return np.array([[fmt.format(l=l, e=e) for e in range(experts)] for l in layers], dtype=object)


def _block_sources(cfg: ModelConfig, kind: str, layers: range) -> dict[Path, Source]:
  """The Sources of one layer stack's parameters, keyed by path inside a Block."""
  d, h, dh = cfg.d_model, cfg.n_heads, cfg.head_dim
  pre = "model.layers.{l}."
  out = {
      ("attn_norm", "scale"): Source(_names(pre + "input_layernorm.weight", layers), (d,), 1, False),
      ("ffn_norm", "scale"): Source(_names(pre + "post_attention_layernorm.weight", layers), (d,), 1, False),
      ("attn", "wo"): Source(_names(pre + "self_attn.o_proj.weight", layers), (h, dh, d), 2, True),
  }
  for p in "qkv":
    out[("attn", f"w{p}")] = Source(_names(pre + f"self_attn.{p}_proj.weight", layers), (d, h, dh), 1, True)

  def swiglu(prefix: str, into: Path, width: int, experts: int = 0) -> None:
    for name in ("gate", "up", "down"):
      tail = (width, d) if name == "down" else (d, width)
      out[into + (f"w_{name}",)] = Source(_names(prefix + f"{name}_proj.weight", layers, experts),
                                          tail, 1, True)

  if kind == "dense":
    swiglu(pre + "mlp.", ("ffn",), cfg.dense_ffn_width)
    return out
  out[("ffn", "router")] = Source(_names(pre + "mlp.gate.weight", layers), (d, cfg.n_routed_experts), 1, True)
  if cfg.n_shared_experts:
    swiglu(pre + "mlp.shared_experts.", ("ffn", "shared"), cfg.n_shared_experts * cfg.expert_width)
  swiglu(pre + "mlp.experts.{e}.", ("ffn", "experts"), cfg.expert_width, cfg.n_routed_experts)
  return out


def sources(cfg: ModelConfig) -> dict[Path, Source]:
  """{parameter path (as nnx.to_flat_state names it): Source} of every parameter."""
  one = lambda name: np.array(name, dtype=object)
  out = {
      ("embed",): Source(one("model.embed_tokens.weight"), (cfg.vocab_size, cfg.d_model), 1, False),
      ("final_norm", "scale"): Source(one("model.norm.weight"), (cfg.d_model,), 1, False),
      ("lm_head",): Source(one("lm_head.weight"), (cfg.d_model, cfg.vocab_size), 1, True),
  }
  first = 0
  for s, (kind, count) in enumerate(layer_runs(cfg)):
    for key, src in _block_sources(cfg, kind, range(first, first + count)).items():
      out[("stacks", s, "blocks") + key] = src
    first += count
  return out


def public_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """{public tensor name: shape} of every tensor a checkpoint of `cfg` holds."""
  return {str(name): src.public_shape for src in sources(cfg).values() for name in src.names.flat}


def path_name(path: Path) -> str:
  return "/".join(map(str, path))


def convert_public_checkpoint(tensors: Mapping[str, Any], cfg: ModelConfig) -> dict[Path, np.ndarray]:
  """Public-name tensors (in memory) -> {parameter path: f32 array} in this model's layout."""
  want = public_shapes(cfg)
  missing = [n for n in want if n not in tensors]
  if missing:
    raise KeyError(f"checkpoint is missing tensor {missing[0]!r} ({len(missing)} missing)")
  unexpected = sorted(set(tensors) - set(want))
  if unexpected:
    raise ValueError(f"checkpoint has {len(unexpected)} tensor(s) this config does not use, "
                     f"e.g. {unexpected[:3]}; is the config right for this checkpoint?")
  out = {}
  for path, src in sources(cfg).items():
    for name in src.names.flat:
      if tuple(np.shape(tensors[name])) != want[name]:
        raise CheckpointFormatError(f"{path_name(path)}: tensor {name!r} has shape "
                                    f"{tuple(np.shape(tensors[name]))}, expected {want[name]}")
    read = lambda name, *index: np.asarray(tensors[name], np.float32)[index]
    out[path] = src.read(read, tuple(slice(None) for _ in src.shape), np.float32)
  return out


def load_public_checkpoint(model: Transformer, tensors: Mapping[str, Any]) -> None:
  """Overwrite `model`'s parameters with the converted public tensors (shapes checked)."""
  params = convert_public_checkpoint(tensors, model.cfg)
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  if set(flat) != set(params):
    raise ValueError(f"parameter layout mismatch: model has {sorted(set(flat) - set(params))[:3]} "
                     f"unfilled, converter made {sorted(set(params) - set(flat))[:3]} unknown")
  for path, var in flat.items():
    var.set_value(jnp.asarray(params[path], var.dtype))
  nnx.update(model, state)
