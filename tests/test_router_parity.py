"""The DeepSeek-V2 and -V3 routers against transformers' MoE layers: the project's MoE layer
with router `group_limited` equals `DeepseekV2Moe` (topk_method group_limited_greedy), and
with router `sigmoid_bias` (a non-zero selection bias) equals `DeepseekV3MoE`, on the same
weights in f32, with top-k, groups and the scaling factor away from their defaults."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.capabilities import import_or_skip

torch = import_or_skip("torch", "torch")
transformers = import_or_skip("transformers", "torch")

from moe.model.config import ModelConfig  # noqa: E402
from moe.model.moe_layer import MoE  # noqa: E402

D, F, E, SHARED, K, GROUPS, KEEP, SCALE = 32, 16, 16, 1, 4, 4, 2, 2.5
T = 48


def hf_config(version: int):
  common = dict(hidden_size=D, moe_intermediate_size=F, n_routed_experts=E, n_shared_experts=SHARED,
                num_experts_per_tok=K, n_group=GROUPS, topk_group=KEEP, routed_scaling_factor=SCALE,
                hidden_act="silu", intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=64)
  if version == 2:
    return transformers.DeepseekV2Config(topk_method="group_limited_greedy", norm_topk_prob=False,
                                         **common)
  return transformers.DeepseekV3Config(norm_topk_prob=True, **common)


def reference_layer(version: int, seed: int = 0):
  """transformers' MoE layer with random weights (the router's large enough that choices
  differ between tokens and groups matter) and, for V3, a non-zero selection bias."""
  cfg = hf_config(version)
  layer = (transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2Moe(cfg) if version == 2
           else transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE(cfg))
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in layer.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    if version == 3:
      layer.gate.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.2)
  return layer.eval()


def ours(version: int, ref, **overrides) -> MoE:
  """The project's MoE layer holding the reference's weights."""
  router = "group_limited" if version == 2 else "sigmoid_bias"
  fields = dict(d_model=D, n_heads=4, router=router, n_routed_experts=E,
                n_shared_experts=SHARED, n_activated_experts=K, expert_width=F, n_group=GROUPS,
                topk_group=KEEP, routed_scaling_factor=SCALE, norm_topk_prob=version == 3)
  cfg = ModelConfig(**{**fields, **overrides})
  layer = MoE(cfg, nnx.Rngs(0))
  w = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  gate_up = w["experts.gate_up_proj"]                                       # [E, 2F, D]
  layer.router[...] = jnp.asarray(w["gate.weight"].T)
  layer.experts.w_gate[...] = jnp.asarray(gate_up[:, :F].transpose(0, 2, 1))
  layer.experts.w_up[...] = jnp.asarray(gate_up[:, F:].transpose(0, 2, 1))
  layer.experts.w_down[...] = jnp.asarray(w["experts.down_proj"].transpose(0, 2, 1))
  for name, hf in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
    getattr(layer.shared, name)[...] = jnp.asarray(w[f"shared_experts.{hf}.weight"].T)
  if version == 3:
    layer.score_bias[...] = jnp.asarray(w["gate.e_score_correction_bias"])
  return layer


def both(version: int, **overrides):
  ref = reference_layer(version)
  x = np.random.default_rng(1).normal(0, 1, (1, T, D)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.tensor(x))[0].numpy()
  layer = ours(version, ref, **overrides)
  got, aux = layer(jnp.asarray(x[0]), jnp.zeros((T,), jnp.int32))
  return np.asarray(got), want, layer, x[0]


@pytest.mark.parametrize("version", [2, 3])
def test_moe_layer_equals_transformers(version):
  got, want, _, _ = both(version)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.std(want) > 0.1


@pytest.mark.parametrize("version", [2, 3])
def test_the_group_limit_decides_choices(version):
  """The comparison can fail: without the group limit (all groups kept), or with the V3
  bias left out, the layer differs from transformers'."""
  got, want, layer, x = both(version, topk_group=GROUPS)
  assert np.max(np.abs(got - want)) > 1e-3
  if version == 3:
    got, want, layer, x = both(version)
    layer.score_bias[...] = jnp.zeros((E,))
    assert np.max(np.abs(np.asarray(layer(jnp.asarray(x), jnp.zeros((T,), jnp.int32))[0]) - want)) > 1e-3


@pytest.mark.parametrize("version", [2, 3])
def test_choices_stay_inside_the_kept_groups(version):
  """Every token's experts lie in at most topk_group groups, and the layer reports them."""
  from moe.model import intervention

  _, _, layer, x = both(version)
  with intervention.intervene(intervention.Intervention(capture=True)):
    _, aux = layer(jnp.asarray(x), jnp.zeros((T,), jnp.int32))
  groups = np.asarray(aux["expert_idx"]) // (E // GROUPS)
  assert max(len(set(row)) for row in groups) <= KEEP
  assert max(len(set(row)) for row in groups) == KEEP  # the limit binds


def test_group_limited_without_a_scaling_factor_is_greedy_softmax():
  """One group, scaling 1: group_limited routes exactly as the paper's topk."""
  kw = dict(d_model=D, n_heads=4, n_routed_experts=E, n_shared_experts=SHARED, n_activated_experts=K,
            expert_width=F)
  a = MoE(ModelConfig(router="topk", **kw), nnx.Rngs(3))
  b = MoE(ModelConfig(router="group_limited", **kw), nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(0), (T, D))
  np.testing.assert_array_equal(a(x, jnp.zeros((T,), jnp.int32))[0], b(x, jnp.zeros((T,), jnp.int32))[0])


ROUTER_FIELDS = {
    "topk": dict(router="topk"),
    "topk_bias": dict(router="topk_bias"),
    "group_limited": dict(router="group_limited", n_group=4, topk_group=2, routed_scaling_factor=2.0),
    "sigmoid_bias": dict(router="sigmoid_bias", n_group=4, topk_group=2, norm_topk_prob=True),
    "topk_null": dict(router="topk", n_null_experts=8),
}


@pytest.mark.parametrize("router", list(ROUTER_FIELDS))
def test_every_router_runs_dropless_on_every_backend(router):
  """The layer's output and input gradient are the same on every dropless backend (each is
  checked against a loop reference in tests/test_dispatch.py and test_null_experts.py)."""
  from moe.dispatch import cpu_kernel

  backends = ["fused", "tiled", "ragged_dot", "pallas_interpret", "few_tokens"]
  backends += ["cpu_ffi"] if cpu_kernel.available() else []
  results = {}
  for backend in backends:
    cfg = ModelConfig(d_model=D, n_heads=4, n_routed_experts=E, n_shared_experts=SHARED,
                      n_activated_experts=K, expert_width=F, dispatch_backend=backend, init_std=0.3,
                      **ROUTER_FIELDS[router])
    layer = MoE(cfg, nnx.Rngs(0))
    if layer.score_bias is not None:
      layer.score_bias[...] = 0.3 * jax.random.normal(jax.random.key(2), layer.score_bias.shape)
    x = jax.random.normal(jax.random.key(1), (T, D))
    f = lambda x: layer(x, jnp.zeros((T,), jnp.int32))
    y, vjp, aux = jax.vjp(f, x, has_aux=True)
    results[backend] = (np.asarray(y), np.asarray(vjp(jnp.cos(y))[0]), aux)
  y0, dx0, aux = results["fused"]
  assert np.std(y0) > 0.01
  for backend, (y, dx, _) in results.items():
    np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5, err_msg=backend)
    np.testing.assert_allclose(dx, dx0, rtol=1e-4, atol=1e-4, err_msg=backend)
  if router == "topk_null":  # some choices went to the zero-compute experts
    assert 0 < float(aux["real_experts_per_token"]) < K
