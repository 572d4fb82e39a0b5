"""Building blocks: parameters with logical axes, RMSNorm, the dense SwiGLU FFN.

Every parameter carries logical axis names in its `axes` metadata (e.g. ('embed', 'mlp')),
which the sharding rules map to mesh axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.dispatch.experts import swiglu
from moe.model.config import ModelConfig
from moe.parallel import mesh as meshes

FFN_BACKENDS = ("auto", "xla", "cpu_ffi")


def ffn_function(name: str, platform: str):
  """The dense SwiGLU for ModelConfig.ffn_backend `name`: "xla" (moe.dispatch.experts.swiglu,
  any platform), "cpu_ffi" (moe.model.cpu_swiglu's C++ kernel, f32 on CPU); "auto" takes
  cpu_ffi on CPU where it builds, else xla."""
  if name not in FFN_BACKENDS:
    raise ValueError(f"unknown FFN backend {name!r}; use one of {FFN_BACKENDS}")
  if name == "xla" or (name == "auto" and platform != "cpu"):
    return swiglu
  from moe.model import cpu_swiglu  # builds the kernel on first use only
  if name == "auto" and not cpu_swiglu.available():  # no C++ compiler here
    return swiglu
  return lambda x, *w: cpu_swiglu.cpu_ffi(x, *w, fallback=swiglu)


def param(rngs: nnx.Rngs, cfg: ModelConfig, shape: tuple[int, ...], axes: tuple[str, ...],
          init: str = "normal") -> nnx.Param:
  """A parameter drawn from N(0, init_std^2) (the paper's init) or set to ones."""
  dtype = jnp.dtype(cfg.param_dtype)
  if init == "ones":
    value = jnp.ones(shape, dtype)
  else:
    value = cfg.init_std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, axes=axes)


class RMSNorm(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.eps = cfg.norm_eps
    self.scale = param(rngs, cfg, (cfg.d_model,), ("embed",), init="ones")

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., d_model]; normalised in fp32, scaled after casting back (as the HF code)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * xf.astype(x.dtype)


class SwiGLU(nnx.Module):
  """A dense SwiGLU FFN of the given width (also the fused shared experts)."""

  def __init__(self, cfg: ModelConfig, width: int, rngs: nnx.Rngs):
    d = cfg.d_model
    self.backend = cfg.ffn_backend
    self.w_gate = param(rngs, cfg, (d, width), ("embed", "mlp"))
    self.w_up = param(rngs, cfg, (d, width), ("embed", "mlp"))
    self.w_down = param(rngs, cfg, (width, d), ("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., d_model] -> [..., d_model]."""
    ffn = ffn_function(self.backend, meshes.target_platform())
    return ffn(x, *(w[...].astype(x.dtype) for w in (self.w_gate, self.w_up, self.w_down)))
