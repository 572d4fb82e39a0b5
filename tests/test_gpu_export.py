"""The GPU defaults lowered for CUDA on this CPU host (jax.export with platforms=("cuda",)):
the training objective's forward and backward with the dispatch "auto" takes on a GPU, and
which backend that is. Nothing here needs a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.dispatch import gpu, registry
from moe.model.decoder import Transformer
from moe.model.loss import objective
from moe.model.presets import get_preset


def test_auto_on_gpu_is_tokamax_where_installed_else_ragged_or_fused():
  usable, why = gpu.tokamax_status()
  assert registry.default_name("gpu") == ("tokamax" if usable else "ragged_or_fused")
  if not usable:
    assert "tokamax" in why
    with pytest.raises(ValueError, match="dispatch backend 'tokamax'"):
      registry.get("tokamax")


def test_cudnn_fusion_is_read_from_compiled_text():
  assert gpu.cudnn_fusion_in('fusion(...), kind=kCustom, backend_config={"kind":"__cudnn$fusion"}')
  assert not gpu.cudnn_fusion_in("ROOT dot = f32[8,8] dot(a, b)")
  assert gpu.cudnn_version() is None or gpu.cudnn_version() > 0  # None on a CPU-only jaxlib


def export_objective_grad(cfg, batch=2, seq=32):
  """jax.export of d objective / d params of a model of cfg for CUDA -> the exported program."""
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)

  def loss(params, tokens):
    return objective(nnx.merge(graphdef, params), tokens, tokens)[0]

  ints = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  return jax.export.export(jax.jit(jax.grad(loss)), platforms=("cuda",))(params, ints)


@pytest.mark.parametrize("d_model, expert_width, ragged", [(64, 32, True), (256, 1408, False)])
def test_the_gpu_default_train_objective_lowers_for_cuda(d_model, expert_width, ragged):
  # ragged_or_fused takes ragged_dot while its dense expansion is small, else the fused loop.
  name = registry.default_name("gpu")
  cfg = get_preset("tiny_deepseekmoe").replace(
      dispatch_backend=name, d_model=d_model, expert_width=expert_width, n_layers=2,
      dtype="bfloat16")
  exported = export_objective_grad(cfg, seq=32 if ragged else 2048)
  assert exported.platforms == ("cuda",)
  text = exported.mlir_module()
  if name == "ragged_or_fused":
    assert ("ragged_dot" in text) == ragged
  assert np.prod(exported.out_avals[0].shape) > 0
