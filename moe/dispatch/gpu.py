"""Grouped matmuls on NVIDIA GPUs, and which one "auto" takes there.

In order of preference:
  tokamax     `tokamax.ragged_dot` (Pallas Mosaic GPU kernels with their own VJP, sm80+):
              an optional package (the `gpu` extra; Python >= 3.12, jax >= 0.11.1), never
              needed on CPU machines, so imported only when asked for.
  ragged_dot  XLA's `jax.lax.ragged_dot`. With cuDNN >= 9.22 XLA:GPU may hand it to a
              cuDNN grouped-GEMM fusion (forward and d lhs, not the weight gradient);
              otherwise it is expanded into a dense product per group
              (docs/bench_moe_gpu.md: 52x the dense limit at the 16B layer shape).
  fused       the XLA loop (moe.dispatch.fused_loop), 4.0x the dense limit there.
`ragged_or_fused` (the registry) takes ragged_dot while its dense expansion stays small.
`experiments.probe_ragged_dot` prints the cuDNN version and whether the fusion fired.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# cuDNN's grouped-GEMM fusion of ragged_dot needs this version (XLA:GPU's condition).
CUDNN_RAGGED_DOT = 92200


@functools.cache
def tokamax_status() -> tuple[bool, str]:
  """(usable, why not): tokamax imports and has ragged_dot."""
  try:
    import tokamax
  except ImportError as e:
    return False, f"tokamax is not installed ({e}); pip install '.[gpu]' on Python >= 3.12"
  if not hasattr(tokamax, "ragged_dot"):
    return False, f"tokamax {getattr(tokamax, '__version__', '?')} has no ragged_dot"
  return True, ""


def tokamax_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """lhs: [m, k], rhs: [G, k, n], group_sizes: [G] -> [m, n] in lhs.dtype, f32 accumulation."""
  import tokamax

  out = tokamax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                           preferred_element_type=jnp.float32)
  # Rows past the groups ("no expert" pairs) are 0 by our gmm contract, whatever tokamax
  # leaves there; the select fuses into the cast.
  inside = (jnp.arange(lhs.shape[0]) < jnp.sum(group_sizes))[:, None]
  return jnp.where(inside, out, 0).astype(lhs.dtype)


def cudnn_version() -> int | None:
  """The loaded cuDNN's version as an integer (9.22.0 -> 92200), or None without CUDA."""
  try:
    from jax._src.lib import cuda_versions  # jaxlib's CUDA plugin; None on CPU-only jaxlib
    return int(cuda_versions.cudnn_get_version()) if cuda_versions is not None else None
  except Exception:  # no GPU plugin, or no cuDNN loaded
    return None


def cudnn_fusion_in(compiled_text: str) -> bool:
  """Whether a compiled XLA:GPU program (`jax.jit(f).lower(...).compile().as_text()`)
  runs a cuDNN fusion (how XLA marks one in the fusion's backend config)."""
  return "__cudnn$fusion" in compiled_text


def default_name() -> str:
  """The dropless backend "auto" takes on a GPU: tokamax where installed, else
  ragged_or_fused."""
  return "tokamax" if tokamax_status()[0] else "ragged_or_fused"
