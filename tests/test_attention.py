"""Attention backends (moe.model.attention_backends) against the reference, over packed rows;
splash attention in interpret mode and compiled by the TPU compiler (no [S, S] scores),
the XLA path lowered for CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from moe.model import attention_backends as ab
from moe.parallel import topology
from moe.parallel.mesh import MeshConfig, make_mesh, use_mesh
from tests.capabilities import tpu_devices_or_skip


def qkv_seg(b=2, s=128, h=2, dh=128, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 3)
  q, k, v = (jax.random.normal(key, (b, s, h, dh), dtype) for key in ks)
  # Packed rows: documents of random lengths (row 0) and one document (row 1).
  cuts = np.sort(np.random.default_rng(seed).choice(np.arange(1, s), 5, replace=False))
  seg = np.stack([np.searchsorted(cuts, np.arange(s), side="right"), np.zeros(s, int)])[:b]
  return q, k, v, jnp.asarray(seg, jnp.int32)


def test_reference_is_the_cache_path_of_the_model():
  """The reference equals Attention.attend (the decode path: keys heads-first, explicit mask)."""
  from flax import nnx
  from moe.model.attention import Attention
  from moe.model.presets import get_preset
  cfg = get_preset("tiny_deepseekmoe").replace(d_model=64, n_heads=2, attention_backend="reference")
  attn = Attention(cfg, nnx.Rngs(0))
  q, k, v, seg = qkv_seg(s=32, dh=cfg.head_dim)
  want = attn.attend(q, k.swapaxes(1, 2), v.swapaxes(1, 2), ab.attention_mask(seg))
  np.testing.assert_allclose(attn.output(ab.reference(q, k, v, seg)), want, rtol=1e-6, atol=1e-6)


def test_xla_equals_the_reference():
  q, k, v, seg = qkv_seg(s=64, dh=32)
  np.testing.assert_allclose(ab.xla(q, k, v, seg), ab.reference(q, k, v, seg), rtol=1e-5, atol=1e-5)
  grad = lambda f: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, seg) ** 2), argnums=(0, 1, 2))(q, k, v)
  for g, g_ref in zip(grad(ab.xla), grad(ab.reference)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_splash_in_interpret_mode_equals_the_reference():
  q, k, v, seg = qkv_seg(b=1, s=128, h=1)
  got = ab.splash(q, k, v, seg, interpret=True)
  np.testing.assert_allclose(got, ab.reference(q, k, v, seg), rtol=2e-5, atol=2e-5)


def test_auto_picks_by_platform():
  assert ab.resolve("auto", "tpu") is ab.splash and ab.resolve("auto", "gpu") is ab.cudnn
  from moe.model import cpu_attention
  assert ab.resolve("auto", "cpu") is (ab.cpu_ffi if cpu_attention.available() else ab.reference)
  with pytest.raises(ValueError, match="unknown attention backend"):
    ab.resolve("flash", "cpu")


tpu = tpu_devices_or_skip


@pytest.mark.parametrize("layout", ["", "fsdp:2,tensor:2"])
def test_splash_compiles_for_tpu_without_seq_by_seq_scores(layout):
  """The 16B attention shape at 4096 tokens per row, forward and backward, by the TPU
  compiler: Mosaic kernels in the program and temporaries far below one f32 [H, S, S]."""
  devices = tpu("v5p:2x2x1")
  b, s, h, dh = 4, 4096, 16, 128
  mesh = make_mesh(MeshConfig(layout), devices) if layout else None
  qkv_sh = NamedSharding(mesh, P(("data", "fsdp", "expert"), None, "tensor")) if mesh else SingleDeviceSharding(devices[0])
  seg_sh = NamedSharding(mesh, P(("data", "fsdp", "expert"))) if mesh else qkv_sh
  args = [jax.ShapeDtypeStruct((b if mesh else 1, s, h, dh), jnp.bfloat16, sharding=qkv_sh)] * 3
  args.append(jax.ShapeDtypeStruct((b if mesh else 1, s), jnp.int32, sharding=seg_sh))

  def loss(q, k, v, seg):
    with use_mesh(mesh):
      return jnp.sum(ab.splash(q, k, v, seg).astype(jnp.float32))

  # The suite's "highest" matmul precision (conftest) would ask splash's bf16 dots for f32
  # passes, which Mosaic rejects; a real run keeps JAX's default.
  with jax.default_matmul_precision("default"):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  assert "tpu_custom_call" in compiled.as_text()
  scores = h * s * s * 4  # one example's f32 scores
  assert compiled.memory_analysis().temp_size_in_bytes < scores / 8


def test_gpu_attention_lowers_to_cudnn_without_f32_scores(monkeypatch):
  """The GPU default lowered for CUDA on this CPU: cuDNN's fused attention forward and
  backward, and no f32 [B, H, S, S] array (XLA's implementation has one)."""
  from jax._src.cudnn import fused_attention_stablehlo as fa
  monkeypatch.setattr(fa, "check_cudnn_version", lambda *a, **k: 91000)  # no cuDNN on a CPU jaxlib
  b, s, h = 2, 1024, 16
  q = jax.ShapeDtypeStruct((b, s, h, 128), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((b, s), jnp.int32)
  calls = ("__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward")
  checks = [jax.export.DisabledSafetyCheck.custom_call(n) for n in calls]

  def lowered(fn):
    loss = lambda q, k, v, sg: jnp.sum(fn(q, k, v, sg).astype(jnp.float32))
    return jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=("cuda",),
                             disabled_checks=checks)(q, q, q, seg).mlir_module()

  scores = f"tensor<{b}x{h}x{s}x{s}xf32>"
  text = lowered(ab.resolve("auto", "gpu"))
  assert all(c in text for c in calls) and scores not in text
  assert scores in lowered(ab.xla)  # the check can fail
