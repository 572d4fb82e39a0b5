"""Attention and loss paths: forward+backward time and compiled temporaries on this machine,
and the TPU compiler's temporaries for the TPU paths at the 16B shape; prints tables.

  python -m experiments.bench_attention [--seq_len=256 --seq_len=1024 --seq_len=2048 --reps=5]

Attention: reference ([B, H, S, S] f32 scores) against jax.nn.dot_product_attention
(`xla`), 4 rows of 8 heads of 64, packed rows (segment ids). Loss: the LM head and
cross-entropy over [B, S, d] hidden states, whole against chunks of 512 positions. TPU
rows (needs `jax[tpu]`; abstract v5p chip): splash attention at 16 heads of 128, and the
loss at d_model 2048 and the 16B's 102400-word vocabulary, 1 row of 4096 tokens, bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from experiments import common_flags, errors
from experiments.timing import temp_bytes, time_ms
from moe.model import attention_backends as ab
from moe.model.loss import chunked_lm_loss, lm_loss
from moe.parallel import topology

_SEQ = common_flags.seq_len(multiple=True)  # CPU rows; default 256, 1024, 2048
_REPS = common_flags.reps()
_CHUNK = 512


def attention_grad(fn):
  return jax.jit(jax.grad(lambda q, k, v, s: jnp.sum(fn(q, k, v, s).astype(jnp.float32)), argnums=(0, 1, 2)))


def loss_grad(chunk: int):
  def f(h, w, t):
    if chunk:
      return chunked_lm_loss(h, w, t, None, chunk)
    return lm_loss(jnp.einsum("bsd,dv->bsv", h, w.astype(h.dtype), preferred_element_type=jnp.float32), t)
  return jax.jit(jax.grad(f, argnums=(0, 1)))


def cpu_rows(seq_lens, reps):
  rows = []
  for s in seq_lens:
    key = jax.random.split(jax.random.key(s), 3)
    q, k, v = (jax.random.normal(kk, (4, s, 8, 64)) for kk in key)
    seg = jnp.asarray(np.repeat(np.arange(4)[None], 4, 0).repeat(s // 4, 1), jnp.int32)
    for name in ("reference", "xla"):
      fn = attention_grad(ab.FUNCTIONS[name])
      args = (q, k, v, seg)
      rows.append(("attention", name, s, time_ms(fn, args, reps), temp_bytes(fn, args)))
    h = jax.random.normal(key[0], (4, s, 128))
    w = jax.random.normal(key[1], (128, 8192)) * 0.05
    t = jax.random.randint(key[2], (4, s), 0, 8192)
    for chunk in (0, _CHUNK):
      fn = loss_grad(chunk)
      rows.append(("loss, vocab 8192", "chunked 512" if chunk else "whole", s,
                   time_ms(fn, (h, w, t), reps), temp_bytes(fn, (h, w, t))))
  return rows


def tpu_rows():
  try:
    device = topology.tpu_devices("v5p:2x2x1")[0]
  except topology.TopologyError as e:
    return [("TPU rows skipped", str(e), 0, 0, 0)]
  sh = SingleDeviceSharding(device)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
  s = 4096
  q, seg = spec((1, s, 16, 128), jnp.bfloat16), spec((1, s), jnp.int32)
  rows = []
  with jax.default_matmul_precision("default"):
    for name in ("reference", "splash"):
      rows.append(("attention (v5p)", name, s, float("nan"),
                   temp_bytes(attention_grad(ab.FUNCTIONS[name]), (q, q, q, seg))))
    h, w, t = spec((1, s, 2048), jnp.bfloat16), spec((2048, 102400), jnp.float32), spec((1, s), jnp.int32)
    for chunk in (0, _CHUNK):
      rows.append(("loss, vocab 102400 (v5p)", "chunked 512" if chunk else "whole", s, float("nan"),
                   temp_bytes(loss_grad(chunk), (h, w, t))))
  return rows


def main(argv):
  del argv
  print(f"{jax.devices()[0].device_kind} x{jax.device_count()}; fwd+bwd, median of {_REPS.value}")
  print("| path | backend | seq | fwd+bwd ms | temporaries MiB |")
  print("|---|---|---:|---:|---:|")
  for path, name, s, ms, temp in cpu_rows(_SEQ.value or [256, 1024, 2048], _REPS.value) + tpu_rows():
    ms_text = "-" if ms != ms else f"{ms:.1f}"
    print(f"| {path} | {name} | {s} | {ms_text} | {temp / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
  errors.run(main)
