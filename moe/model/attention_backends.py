"""Causal self-attention over packed rows, one function per backend, chosen by
ModelConfig.attention_backend:

    reference  scores [B, H, S, S] in f32, masked, softmax (any platform)
    cpu_ffi    a C++ FFI kernel per (example, head), no [B, H, S, S] array in the program
               (moe.model.cpu_attention; CPU's default where it builds, f32)
    xla        jax.nn.dot_product_attention, XLA's implementation (builds the scores)
    cudnn      jax.nn.dot_product_attention on cuDNN's fused kernel, the document mask as a
               [B, 1, S, S] bias (GPU's default; bf16/fp16, f32 falls back to `xla`)
    splash     TPU splash attention (Pallas, Mosaic): blocks of 128 queries/keys, causal
               mask and segment ids in the kernel, no [S, S] array anywhere (TPU's default)

All take q, k, v: [B, S, H, Dh] (q and k rotated) and segment_ids: [B, S] (attention stays
within a packed document) and return [B, S, H, Dh]; tests check each against `reference`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe.parallel import mesh as meshes

BACKENDS = ("auto", "reference", "cpu_ffi", "xla", "cudnn", "splash")
AUTO = {"tpu": "splash", "gpu": "cudnn", "cpu": "cpu_ffi"}
SPLASH_BLOCK = 128  # splash's query and key blocks; rows not a multiple of it use `xla`


def attention_mask(segment_ids: jax.Array) -> jax.Array:
  """segment_ids: [B, S] -> [B, 1, S, S] bool: causal and within the same packed document."""
  s = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((s, s), bool))
  same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (causal[None] & same_doc)[:, None]


def masked(q, k, v, mask):
  """q: [B, Sq, H, Dh], k, v: [B, H, Sk, Dh] (heads before length: a KV cache's layout,
  read without a transposed copy), mask: [B, 1, Sq, Sk] -> [B, Sq, H, Dh]; scores in f32."""
  scores = jnp.einsum("bqhk,bhsk->bhqs", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
  scores = jnp.where(mask, scores * q.shape[-1] ** -0.5, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("bhqs,bhsk->bqhk", probs, v.astype(q.dtype))


def reference(q, k, v, segment_ids):
  """Scores in f32 [B, H, S, S]: the definition the other backends are checked against."""
  return masked(q, k.swapaxes(1, 2), v.swapaxes(1, 2), attention_mask(segment_ids))


def _dot_product_attention(q, k, v, segment_ids, implementation):
  same_doc = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=same_doc,
                                      is_causal=True, implementation=implementation)


def xla(q, k, v, segment_ids):
  """jax.nn.dot_product_attention, XLA's implementation (it builds the scores, like the
  reference, on every platform)."""
  return _dot_product_attention(q, k, v, segment_ids, "xla")


def cudnn(q, k, v, segment_ids):
  """cuDNN's fused attention (GPU; bf16/fp16 only: f32 inputs take `xla`). The document
  mask reaches it as a [B, 1, S, S] bias in the input dtype; no [B, H, S, S] scores."""
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return xla(q, k, v, segment_ids)
  return _dot_product_attention(q, k, v, segment_ids, "cudnn")


@functools.cache
def _splash_kernel(seq_len: int, n_heads: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  mask = sm.MultiHeadMask([sm.CausalMask((seq_len, seq_len)) for _ in range(n_heads)])
  block = SPLASH_BLOCK
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                        block_kv_dq=block)
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                            interpret=interpret), sk.SegmentIds


def splash(q, k, v, segment_ids, interpret: bool = False):
  """Splash attention per example ([H, S, Dh] layout), per shard on a mesh (per_shard)."""
  b, s, h, dh = q.shape
  if s % SPLASH_BLOCK:  # the kernel's blocks must tile the row
    return xla(q, k, v, segment_ids)

  def local(q, k, v, seg):
    kernel, segment_ids_type = _splash_kernel(q.shape[1], q.shape[2], interpret)
    heads_first = lambda a: a.transpose(0, 2, 1, 3)
    out = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=segment_ids_type(seg, seg)))(
        heads_first(q * (1.0 / math.sqrt(dh))).astype(q.dtype), heads_first(k).astype(q.dtype),
        heads_first(v).astype(q.dtype), seg)
    return heads_first(out)

  return per_shard(local, q, k, v, segment_ids)


def per_shard(fn, q, k, v, segment_ids):
  """fn(q, k, v, segment_ids) on each shard of the batch (batch axes) and heads (`tensor`)
  of the active mesh, or once without one: kernels XLA does not partition (Mosaic, FFI
  custom calls) see whole examples and heads."""
  mesh = meshes.active_mesh()
  if mesh is None:
    return fn(q, k, v, segment_ids)
  qkv = P(meshes.BATCH_AXES, None, "tensor", None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, P(meshes.BATCH_AXES, None)),
                       out_specs=qkv, check_vma=False)(q, k, v, segment_ids)


def cpu_ffi(q, k, v, segment_ids):
  """The C++ kernel (moe.model.cpu_attention); other dtypes take the reference."""
  from moe.model import cpu_attention  # builds the kernel on first use only
  return cpu_attention.cpu_ffi(q, k, v, segment_ids)


FUNCTIONS = {"reference": reference, "cpu_ffi": cpu_ffi, "xla": xla, "cudnn": cudnn, "splash": splash}


def resolve(name: str, platform: str):
  """The attention function `name` stands for ("auto": by the platform traced for)."""
  if name not in BACKENDS:
    raise ValueError(f"unknown attention backend {name!r}; use one of {BACKENDS}")
  if name == "auto":
    name = AUTO.get(platform, "reference")
    if name == "cpu_ffi":
      from moe.model import cpu_attention
      name = "cpu_ffi" if cpu_attention.available() else "reference"  # no C++ compiler here
  return FUNCTIONS[name]
