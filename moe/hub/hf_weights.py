"""The public DeepSeek-MoE checkpoint's tensors (HF naming, torch [out, in] layout) as this
model's parameters.

    cfg = config_from_hf(json.load(open('config.json')))      # moe.hub.hf_config
    model = Transformer(cfg, nnx.Rngs(0))
    load_public_checkpoint(model, tensors)   # tensors: {name: array}, e.g. from safetensors
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe.model.config import ModelConfig
from moe.model.decoder import Transformer, layer_runs

Path = tuple[Any, ...]


class _Reader:
  """Takes tensors by public name, remembering which were used."""

  def __init__(self, tensors: Mapping[str, Any]):
    self.tensors, self.used = tensors, set()

  def __call__(self, name: str) -> np.ndarray:
    if name not in self.tensors:
      raise KeyError(f"checkpoint is missing tensor {name!r}")
    self.used.add(name)
    return np.asarray(self.tensors[name], dtype=np.float32)


def _layer_params(read: _Reader, cfg: ModelConfig, layer: int, kind: str) -> dict[Path, np.ndarray]:
  """One decoder layer's public tensors in this model's layout (kernels are [in, out])."""
  pre = f"model.layers.{layer}."
  d, h, dh = cfg.d_model, cfg.n_heads, cfg.head_dim
  out = {
      ("attn_norm", "scale"): read(pre + "input_layernorm.weight"),
      ("ffn_norm", "scale"): read(pre + "post_attention_layernorm.weight"),
      ("attn", "wo"): read(pre + "self_attn.o_proj.weight").T.reshape(h, dh, d),
  }
  for proj in "qkv":
    out[("attn", f"w{proj}")] = read(pre + f"self_attn.{proj}_proj.weight").T.reshape(d, h, dh)

  def swiglu(prefix: str, into: Path) -> None:
    for name in ("gate", "up", "down"):
      out[into + (f"w_{name}",)] = read(f"{prefix}{name}_proj.weight").T

  if kind == "dense":
    swiglu(pre + "mlp.", ("ffn",))
    return out
  out[("ffn", "router")] = read(pre + "mlp.gate.weight").T
  if cfg.n_shared_experts:
    swiglu(pre + "mlp.shared_experts.", ("ffn", "shared"))
  for name in ("gate", "up", "down"):
    out[("ffn", "experts", f"w_{name}")] = np.stack([
        read(f"{pre}mlp.experts.{e}.{name}_proj.weight").T for e in range(cfg.n_routed_experts)])
  return out


def convert_public_checkpoint(tensors: Mapping[str, Any], cfg: ModelConfig) -> dict[Path, np.ndarray]:
  """Public-name tensors -> {parameter path: array} in this model's layout and nesting."""
  read = _Reader(tensors)
  out: dict[Path, np.ndarray] = {
      ("embed",): read("model.embed_tokens.weight"),
      ("final_norm", "scale"): read("model.norm.weight"),
      ("lm_head",): read("lm_head.weight").T,
  }
  layer = 0
  for s, (kind, count) in enumerate(layer_runs(cfg)):
    per_layer = [_layer_params(read, cfg, layer + i, kind) for i in range(count)]
    for key in per_layer[0]:
      out[("stacks", s, "blocks") + key] = np.stack([p[key] for p in per_layer])
    layer += count
  unexpected = sorted(set(tensors) - read.used)
  if unexpected:
    raise ValueError(f"checkpoint has {len(unexpected)} tensor(s) this config does not use, "
                     f"e.g. {unexpected[:3]}; is the config right for this checkpoint?")
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
    if var.shape != params[path].shape:
      raise ValueError(f"{'/'.join(map(str, path))}: checkpoint shape {params[path].shape} "
                       f"!= model shape {var.shape}")
    var.set_value(jnp.asarray(params[path], var.dtype))
  nnx.update(model, state)
