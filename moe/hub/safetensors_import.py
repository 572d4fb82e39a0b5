"""A checkpoint directory in the released format, read straight into the model's parameters
in their shards: `model.safetensors` (or `model.safetensors.index.json` + shards) and
`config.json`.

    ckpt = import_checkpoint('deepseek-moe-16b-base', mesh)      # bf16 unless dtype=...
    model = nnx.merge(ckpt.graphdef, ckpt.params)

Everything is checked from the files' headers before a byte of data is read (file names
that would leave the directory, files that are not regular files, malformed headers and
config.json fields, missing shard files, tensors the index names that no shard holds,
missing or unknown tensors, shapes and dtypes; CheckpointFormatError names them). Each parameter is then built one device's block
at a time: the block reads only the tensors, and their rows, it covers
(moe.hub.hf_weights.Source.read) and goes onto its device before the next block is read,
so a host holds one block of one parameter, never the whole model.

The tensors are read with plain file reads at the offsets the safetensors header gives,
not through `safetensors.safe_open`'s memory map: pages of a mapped file count as the
process's memory until the file is closed, and reopening it per tensor re-parses its header
(milliseconds, for thousands of tensors per shard).
"""

from __future__ import annotations

import collections
import contextlib
import os
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from moe.hub.hf_config import CheckpointFormatError, config_from_hf
from moe.hub.hf_weights import Source, path_name, public_shapes, sources
from moe.hub.safetensors_header import file_in, open_regular, read_header, read_json_object
from moe.model.config import ModelConfig
from moe.model.decoder import Transformer
from moe.parallel.rules import state_shardings

CONFIG, SINGLE, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
# Stored dtypes that are read (and cast to the target dtype); others are refused by name.
NP_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}


class TensorInfo(NamedTuple):
  file: str    # shard file name, relative to the directory
  shape: tuple[int, ...]
  dtype: str   # safetensors' name: F32, BF16, ...
  offset: int  # of its first byte in the file


class SafetensorsCheckpoint:
  """A checkpoint directory's config.json and tensor headers; data is read lazily. The
  directory is untrusted input: every file name stays inside it, only regular files are
  opened (moe.hub.safetensors_header), and what does not parse is refused by name."""

  def __init__(self, directory: str):
    self.directory = directory
    config = os.path.join(directory, CONFIG)
    if not os.path.lexists(config):
      raise CheckpointFormatError(f"{directory}: no {CONFIG}; is this a checkpoint directory?")
    self.hf_config: dict[str, Any] = read_json_object(file_in(directory, CONFIG, directory))
    self.tensors = self._headers()

  def _weight_map(self) -> dict[str, str] | None:
    """The index's {tensor: shard file name}, or None for a single model.safetensors."""
    index_path = os.path.join(self.directory, INDEX)
    if os.path.lexists(index_path):
      weight_map = read_json_object(file_in(self.directory, INDEX, self.directory)).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointFormatError(f"{index_path}: no 'weight_map' object of tensor name -> shard file "
                                    f"name (got {type(weight_map).__name__})")
      for name, file in weight_map.items():
        if not isinstance(file, str):
          raise CheckpointFormatError(f"{index_path}: weight_map[{name!r}] = {file!r} is not a file name")
      for file in set(weight_map.values()):
        file_in(self.directory, file, INDEX)  # refuses paths and symlinks out of the directory
      return weight_map
    if os.path.lexists(os.path.join(self.directory, SINGLE)):
      return None
    raise CheckpointFormatError(f"{self.directory}: neither {SINGLE} nor {INDEX}")

  def _headers(self) -> dict[str, TensorInfo]:
    weight_map = self._weight_map()
    files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE]
    for file in files:
      if not os.path.lexists(os.path.join(self.directory, file)):
        named = sorted(n for n, f in weight_map.items() if f == file)
        raise CheckpointFormatError(f"{INDEX} names shard file {file!r} ({len(named)} tensors, e.g. "
                                    f"{named[0]!r}), which is not in {self.directory}")
    out = {}
    for file in files:
      start, header = read_header(file_in(self.directory, file, self.directory))
      for name, h in header.items():
        if weight_map is not None and weight_map.get(name) != file:
          where = f"places in {weight_map[name]!r}" if name in weight_map else "does not name"
          raise CheckpointFormatError(f"shard {file!r} holds tensor {name!r}, which {INDEX} {where}")
        out[name] = TensorInfo(file, tuple(h["shape"]), h["dtype"], start + h["data_offsets"][0])
    for name, file in (weight_map or {}).items():
      if name not in out:
        raise CheckpointFormatError(f"{INDEX} places tensor {name!r} in shard {file!r}, which "
                                    f"does not hold it")
    return out

  def check_count(self, cfg: ModelConfig) -> None:
    """Refuses a config.json that implies far more tensors than the headers hold (a corrupt
    layer or expert count) from the counts alone: before millions of names are listed or a
    model that size is built. At least one tensor per layer and per routed expert of each
    MoE layer; a near miss is left to `check`, which lists what is missing."""
    least = cfg.n_layers + cfg.n_moe_layers * cfg.n_routed_experts
    if least > 2 * len(self.tensors) + 100:
      raise CheckpointFormatError(f"{self.directory}: config.json implies at least {least} tensors "
                                  f"({cfg.n_layers} layers, {cfg.n_routed_experts} routed experts); "
                                  f"the checkpoint holds {len(self.tensors)}. Is config.json right "
                                  f"for these weights?")

  def check(self, cfg: ModelConfig) -> None:
    """Every tensor `cfg`'s model needs is here, with its shape and a float dtype, and no other."""
    self.check_count(cfg)
    want = public_shapes(cfg)
    missing = [n for n in want if n not in self.tensors]
    if missing:
      raise CheckpointFormatError(f"{self.directory}: {len(missing)} tensor(s) missing, e.g. "
                                  f"{missing[:3]}; is config.json right for these weights?")
    unknown = sorted(set(self.tensors) - set(want))
    if unknown:
      raise CheckpointFormatError(f"{self.directory}: {len(unknown)} unknown tensor(s) this model "
                                  f"does not use, e.g. {unknown[:3]} (in {self.tensors[unknown[0]].file!r})")
    for name, shape in want.items():
      info = self.tensors[name]
      if info.shape != shape:
        raise CheckpointFormatError(f"tensor {name!r} in {info.file!r} has shape {info.shape}; "
                                    f"config.json implies {shape}")
      if info.dtype not in NP_DTYPES:
        raise CheckpointFormatError(f"tensor {name!r} in {info.file!r} has dtype {info.dtype}; "
                                    f"expected one of {sorted(NP_DTYPES)}")

  @contextlib.contextmanager
  def reader(self) -> Iterator[Any]:
    """read(name, rows[, cols]) -> that block of a tensor (1-D or 2-D), read with plain file
    reads, not a memory map: mapped pages would count as this process's memory until
    unmapped. Reads whole rows of the row range (so at most one tensor's worth at a time)."""
    files: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
      def read(name: str, rows: slice, *cols: slice) -> np.ndarray:
        info = self.tensors[name]
        if info.file not in files:
          path = file_in(self.directory, info.file, self.directory)
          files[info.file] = stack.enter_context(open_regular(path))
        f = files[info.file]
        start, stop, _ = rows.indices(info.shape[0])
        out = np.empty((stop - start,) + info.shape[1:], NP_DTYPES[info.dtype])
        f.seek(info.offset + start * out[:1].nbytes)
        if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
          raise CheckpointFormatError(f"{info.file}: short read of tensor {name!r}")
        return out[(slice(None),) + cols]
      yield read


def load_param(ckpt: SafetensorsCheckpoint, src: Source, sharding, dtype) -> jax.Array:
  """One parameter in its shards: each addressable device's block read from the files and
  put on the device before the next is read (a replicated block once, for all its devices),
  so the host holds one block at a time."""
  index_map = sharding.addressable_devices_indices_map(src.shape)
  keys = {d: tuple(s.indices(n) for s, n in zip(index, src.shape)) for d, index in index_map.items()}
  left = collections.Counter(keys.values())  # devices still to serve, per block
  blocks: dict[Any, np.ndarray] = {}
  arrays = []
  with ckpt.reader() as read:
    for device, index in index_map.items():
      key = keys[device]
      if key not in blocks:
        blocks[key] = src.read(read, index, dtype)
      arrays.append(jax.device_put(blocks[key], device))
      left[key] -= 1
      if not left[key]:
        del blocks[key]
  return jax.make_array_from_single_device_arrays(src.shape, sharding, arrays)


def param_shardings(params: Any, mesh: Mesh | None) -> dict[Any, Any]:
  """{path: sharding} of abstract params: the rules' on `mesh`, else this host's first device."""
  if mesh is None:
    one = SingleDeviceSharding(jax.local_devices()[0])
    return {path: one for path, _ in nnx.to_flat_state(params)}
  return {path: var.get_value() for path, var in nnx.to_flat_state(state_shardings(params, mesh))}


def abstract_params(cfg: ModelConfig):
  """(graphdef, params as ShapeDtypeStructs): nothing allocated."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)


def stream_params(ckpt: SafetensorsCheckpoint, cfg: ModelConfig, params: Any,
                  mesh: Mesh | None) -> Iterator[tuple[Any, jax.Array]]:
  """(path, array in its shards) of each parameter of the abstract `params`, one at a time."""
  ckpt.check(cfg)
  srcs, shardings = sources(cfg), param_shardings(params, mesh)
  for path, var in nnx.to_flat_state(params):
    src = srcs[path]
    if src.shape != tuple(var.shape):  # the mapping and the model disagree: a bug here
      raise CheckpointFormatError(f"{path_name(path)}: mapped shape {src.shape} != model shape {var.shape}")
    yield path, load_param(ckpt, src, shardings[path], jnp.dtype(var.dtype))


class ImportedCheckpoint(NamedTuple):
  model_cfg: ModelConfig
  graphdef: Any    # nnx.merge(graphdef, params) is the Transformer
  params: Any      # nnx.State of the model's nnx.Param variables, in their shards
  mesh: Mesh | None
  hf_config: dict[str, Any]


def import_checkpoint(directory: str, mesh: Mesh | None = None, dtype: str = "bfloat16",
                      **overrides) -> ImportedCheckpoint:
  """A checkpoint directory as this model's parameters, in `dtype` ('bfloat16' or
  'float32'; the ModelConfig's param_dtype and, unless overridden, its compute dtype),
  split over `mesh` by the rules (None: one device). `overrides`: ModelConfig fields that
  do not change the parameters (remat, dispatch_backend, dtype, ...)."""
  ckpt = SafetensorsCheckpoint(directory)
  name = os.path.basename(os.path.normpath(directory))
  cfg = config_from_hf(ckpt.hf_config, **{"name": name, "dtype": dtype, "param_dtype": dtype, **overrides})
  ckpt.check_count(cfg)  # before the abstract model: a corrupt config.json may imply a huge one
  graphdef, params = abstract_params(cfg)
  variables = dict(nnx.to_flat_state(params))  # the same Variables `params` holds
  for path, array in stream_params(ckpt, cfg, params, mesh):
    variables[path].set_value(array)
  return ImportedCheckpoint(cfg, graphdef, params, mesh, ckpt.hf_config)
