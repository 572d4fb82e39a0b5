"""Does this platform run jax.lax.ragged_dot as a grouped GEMM, or expand it densely?

  python -m experiments.probe_ragged_dot                       # the DeepSeekMoE-16B shape
  python -m experiments.probe_ragged_dot --dtype=float32 --rows=4096 --k=512 --n=128

Prints forward and forward+backward time of ragged_dot([rows, k], [groups, k, n]) with
equal groups, one dense matmul of the same FLOPs, and the compiled temporaries. A dense
expansion shows as temporaries near moe.dispatch.backend.ragged_dot_bytes (groups x rows x max(k, n))
and a time far above the dense matmul's; `ragged_or_fused` on GPU assumes it (docs/bench_moe_gpu.md).
On a GPU it also prints the cuDNN version and whether XLA handed ragged_dot to a cuDNN
grouped-GEMM fusion (forward, and forward+backward), and times tokamax.ragged_dot where
that package is installed (moe.dispatch.gpu).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import flags

from experiments import common_flags, errors
from experiments.timing import temp_bytes, time_ms
from moe.dispatch import gpu
from moe.dispatch.backend import ragged_dot_bytes


def probe(rows: int, k: int, n: int, groups: int, dtype: str, reps: int) -> dict[str, float]:
  if rows % groups:
    raise ValueError(f"--rows={rows} must be a multiple of --groups={groups} (equal groups)")
  keys = jax.random.split(jax.random.key(0), 2)
  lhs = jax.random.normal(keys[0], (rows, k), dtype)
  rhs = 0.02 * jax.random.normal(keys[1], (groups, k, n), dtype)
  sizes = jnp.full((groups,), rows // groups, jnp.int32)
  ragged = lambda a, b: jax.lax.ragged_dot(a, b, sizes, preferred_element_type=jnp.float32)
  fwd = jax.jit(ragged)
  grad = jax.jit(jax.grad(lambda a, b: jnp.sum(ragged(a, b)), argnums=(0, 1)))
  dense = jax.jit(lambda a, b: jnp.dot(a, b[0], preferred_element_type=jnp.float32))
  out = {"fwd_ms": time_ms(fwd, (lhs, rhs), reps), "fwd_bwd_ms": time_ms(grad, (lhs, rhs), reps),
         "dense_fwd_ms": time_ms(dense, (lhs, rhs), reps),
         "fwd_temp_mib": temp_bytes(fwd, (lhs, rhs)) / 2**20,
         "fwd_bwd_temp_mib": temp_bytes(grad, (lhs, rhs)) / 2**20,
         "dense_expansion_mib": ragged_dot_bytes(rows, rhs) / 2**20}
  if jax.default_backend() == "gpu":
    out["cudnn_version"] = gpu.cudnn_version() or 0
    out["cudnn_fusion_fwd"] = gpu.cudnn_fusion_in(fwd.lower(lhs, rhs).compile().as_text())
    out["cudnn_fusion_fwd_bwd"] = gpu.cudnn_fusion_in(grad.lower(lhs, rhs).compile().as_text())
  if gpu.tokamax_status()[0]:
    tok = lambda a, b: gpu.tokamax_gmm(a, b, sizes)
    out["tokamax_fwd_ms"] = time_ms(jax.jit(tok), (lhs, rhs), reps)
    out["tokamax_fwd_bwd_ms"] = time_ms(
        jax.jit(jax.grad(lambda a, b: jnp.sum(tok(a, b).astype(jnp.float32)), argnums=(0, 1))),
        (lhs, rhs), reps)
  return out


_ROWS = flags.DEFINE_integer("rows", 49152, "rows (tokens x K')")
_K = flags.DEFINE_integer("k", 2048, "contraction width (d_model)")
_N = flags.DEFINE_integer("n", 1408, "output width (expert width)")
_GROUPS = flags.DEFINE_integer("groups", 64, "groups (experts)")
_DTYPE = common_flags.dtype()  # default bfloat16 (a TPU/GPU probe)
_REPS = common_flags.reps()


def main(argv):
  del argv
  dtype = _DTYPE.value or "bfloat16"
  result = probe(_ROWS.value, _K.value, _N.value, _GROUPS.value, dtype, _REPS.value)
  print(f"ragged_dot [{_ROWS.value}, {_K.value}] x [{_GROUPS.value}, {_K.value}, {_N.value}] {dtype} on "
        f"{jax.devices()[0].device_kind}")
  for name, value in result.items():
    print(f"  {name:20s} {value!s:>10s}" if isinstance(value, bool) else f"  {name:20s} {value:10.2f}")
  print(f"  forward over dense: {result['fwd_ms'] / result['dense_fwd_ms']:.1f}x")


if __name__ == "__main__":
  errors.run(main)
