"""Meshes, sharding rules and expert parallelism on 8 simulated CPU devices.

The sharded train step's loss and gradients must equal the single-device ones, and every
parameter must sit where the rules table says.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data.input_pipeline import random_batch
from moe.dispatch import registry
from moe.model.config import ModelConfig
from moe.parallel import rules
from moe.parallel.expert_parallel import all_to_all_bytes, block_rows, expert_parallel_moe
from moe.parallel.mesh import MeshConfig, MeshError, make_mesh, use_mesh
from moe.train.config import TrainConfig
from moe.train.loop import train_and_evaluate
from moe.train.state import init_state
from moe.train.steps import batch_objective, make_steps, put_batch
from tests.reference import all_to_all_bytes_sent, capacity_keep, loop_moe

LAYOUTS = ["data:8", "data:2,expert:4", "fsdp:2,expert:2,tensor:2", "expert:8"]

CFG = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=32,
                  dense_ffn_width=128, n_routed_experts=8, n_shared_experts=1,
                  n_activated_experts=2, expert_width=32, first_k_dense_replace=1,
                  device_balance_alpha=0.1, n_device_groups=2, router_z_loss_alpha=0.01)


def mesh_of(shape):
  return make_mesh(MeshConfig(shape))


def make_batch():
  return random_batch(8, 16, CFG.vocab_size)


def loss_and_grads(cfg, mesh, batch):
  graphdef, state = init_state(cfg, TrainConfig(), mesh)

  def f(state, batch):
    with use_mesh(mesh):
      model, _ = nnx.merge(graphdef, state)
      (loss, _), grads = nnx.value_and_grad(batch_objective, has_aux=True)(model, batch, None)
      return loss, grads

  loss, grads = jax.jit(f)(state, put_batch(batch, mesh))
  return float(loss), grads, state


@pytest.fixture(scope="module")
def single_device():
  return loss_and_grads(CFG, None, make_batch())


# ---------------------------------------------------------------------------------------
# Mesh configuration.

@pytest.mark.parametrize("shape, error", [
    ("data:4", "has 4 devices but 8 are available"),
    ("data:2,model:4", "unknown axis 'model'"),
    ("data:2,data:4", "given twice"),
    ("data:x", "not an integer"),
    ("data:-1,expert:-1", "only one axis may be -1"),
    ("data:3,expert:-1", "do not divide by 3"),
])
def test_bad_mesh_is_a_clear_error(shape, error):
  with pytest.raises(MeshError, match=error):
    mesh_of(shape)


def test_mesh_fills_minus_one_and_orders_axes():
  mesh = mesh_of("expert:2,data:-1")
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "expert": 2, "tensor": 1}
  assert mesh_of("") is None


def test_indivisible_dimension_names_the_parameter():
  mesh = mesh_of("expert:8")
  with pytest.raises(MeshError, match=r"w_gate.*'expert' of size 6 does not divide.*8"):
    rules.partition_spec(("expert", "embed"), (6, 64), mesh, "w_gate")
  with pytest.raises(MeshError, match="batch_size=4 does not split over the 8 batch shards"):
    rules.check_batch(mesh, 4, "batch_size")


# ---------------------------------------------------------------------------------------
# Sharded train step == single device.

def _spec(state, path):
  var = state
  for key in path:
    var = var[key]
  arr = var.get_value()
  return tuple(arr.sharding.spec) + (None,) * (arr.ndim - len(arr.sharding.spec))


EXPERTS = (0, "stacks", 1, "blocks", "ffn", "experts")
EXPECTED = {  # written out from the rules table: embed->fsdp, mlp/heads/vocab->tensor, expert->expert
    "fsdp:2,expert:2,tensor:2": {
        EXPERTS + ("w_gate",): (None, "expert", "fsdp", "tensor"),
        EXPERTS + ("w_down",): (None, "expert", "tensor", "fsdp"),
        (0, "stacks", 1, "blocks", "ffn", "router"): (None, "fsdp", "expert"),
        (0, "stacks", 1, "blocks", "ffn", "shared", "w_up"): (None, "fsdp", "tensor"),
        (0, "stacks", 0, "blocks", "attn", "wq"): (None, "fsdp", "tensor", None),
        (0, "stacks", 0, "blocks", "ffn", "w_down"): (None, "tensor", "fsdp"),
        (0, "embed",): (None, "fsdp"),
        (0, "lm_head",): ("fsdp", "tensor"),
        (0, "final_norm", "scale"): ("fsdp",),
        (1, "opt_state", 1, 0, "mu") + EXPERTS[1:] + ("w_gate",): (None, "expert", "fsdp", "tensor"),
    },
    "expert:8": {
        EXPERTS + ("w_up",): (None, "expert", None, None),
        (0, "stacks", 1, "blocks", "ffn", "router"): (None, None, "expert"),
        (0, "lm_head",): (None, None),
    },
    "data:2,expert:4": {EXPERTS + ("w_gate",): (None, "expert", None, None)},
    "data:8": {EXPERTS + ("w_gate",): (None, None, None, None), (0, "lm_head",): (None, None)},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_step_matches_single_device(layout, single_device):
  loss0, grads0, _ = single_device
  loss, grads, state = loss_and_grads(CFG, mesh_of(layout), make_batch())
  assert loss == pytest.approx(loss0, rel=1e-6)
  flat0 = jax.tree_util.tree_leaves_with_path(grads0)
  flat = jax.tree_util.tree_leaves_with_path(grads)
  assert [p for p, _ in flat0] == [p for p, _ in flat]
  for (path, g0), (_, g) in zip(flat0, flat):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-4, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  for path, want in EXPECTED[layout].items():
    assert _spec(state, path) == want, path
  # The optimizer's step count has no axes: replicated.
  assert tuple(state[1]["step"].get_value().sharding.spec) == ()


def _three_steps(mesh, cfg=CFG):
  """(losses, final parameters, per-layer metrics of the last step) of 3 train steps
  (forward, backward, AdamW update) from the same initial state."""
  graphdef, state = init_state(cfg, TrainConfig(), mesh)
  steps = make_steps(graphdef, state, mesh)
  losses = []
  for i in range(3):
    batch = put_batch(random_batch(8, 16, cfg.vocab_size, seed=i), mesh)
    state, metrics = steps.train(state, batch, jax.random.key(i))
    losses.append(float(metrics["loss"]))
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(state[0]))
  return losses, params, jax.tree.map(np.asarray, metrics["layers"])


# The DeepSeek-V2/V3 routers and zero-compute experts (their groups = the 4 expert shards).
ROUTER_CFGS = {
    "v1": CFG,
    "v2_group_limited": CFG.replace(router="group_limited", n_group=4, topk_group=2,
                                    routed_scaling_factor=1.5),
    "v3_sigmoid_bias": CFG.replace(router="sigmoid_bias", n_group=4, topk_group=1,
                                   norm_topk_prob=True, routed_scaling_factor=2.0,
                                   seq_balance_alpha=0.01),
    "null_experts": CFG.replace(router="topk_bias", n_null_experts=2),
}


@pytest.mark.parametrize("layout, router", [("data:2,expert:4", "v1"), ("fsdp:2,expert:2,tensor:2", "v1"),
                                            ("data:2,expert:4", "v2_group_limited"),
                                            ("data:2,expert:4", "v3_sigmoid_bias"),
                                            ("data:2,expert:4", "null_experts")])
def test_train_steps_with_the_rounds_equal_one_device(layout, router):
  """The default dropless exchange (rounds of all_to_alls in a while loop, inside the layer
  scan, beside the gradient reductions) runs inside the whole jitted train step on the CPU
  mesh (moe/cpu_threads.py keeps its collectives from starving XLA:CPU's thread pool), for
  every router family (selection biases move between steps)."""
  cfg = ROUTER_CFGS[router]
  losses0, params0, _ = _three_steps(None, cfg)
  losses, params, layers = _three_steps(mesh_of(layout), cfg)
  assert losses == pytest.approx(losses0, rel=1e-5)
  flat0 = jax.tree_util.tree_leaves_with_path(params0)
  flat = jax.tree_util.tree_leaves_with_path(params)
  assert [p for p, _ in flat0] == [p for p, _ in flat]
  for (path, p0), (_, p) in zip(flat0, flat):
    np.testing.assert_allclose(p, p0, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  # The rounds ran (the capacity exchange reports no block load) and served every pair.
  assert np.all(layers["ep_rounds"] >= 1) and np.all(layers["ep_max_block_load"] > 0)


def test_device_balance_groups_default_to_expert_shards():
  cfg = CFG.replace(n_device_groups=0, expert_balance_alpha=0.0, device_balance_alpha=1.0)
  sharded, _, _ = loss_and_grads(cfg, mesh_of("data:2,expert:4"), make_batch())
  four, _, _ = loss_and_grads(cfg.replace(n_device_groups=4), None, make_batch())
  one, _, _ = loss_and_grads(cfg.replace(n_device_groups=1), None, make_batch())
  assert sharded == pytest.approx(four, rel=1e-6)
  assert abs(four - one) > 1e-4  # the grouping is visible in the loss


# ---------------------------------------------------------------------------------------
# The expert-parallel layer alone: dropless, with capacity, with the Pallas kernels.

def _layer_inputs(t=64, d=16, e=8, f=8, k=2, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(ks[0], (t, d))
  scores = jax.nn.softmax(jax.random.normal(ks[1], (t, e)) * 3, axis=-1)
  gates, idx = jax.lax.top_k(scores, k)
  w = (jax.random.normal(ks[2], (e, d, f)) * 0.3, jax.random.normal(ks[3], (e, d, f)) * 0.3,
       jax.random.normal(ks[4], (e, f, d)) * 0.3)
  return x, gates, idx.astype(jnp.int32), w


def _ep(mesh, x, gates, idx, w, cf, backend="tiled"):
  fn = jax.jit(lambda *a: expert_parallel_moe(*a[:3], a[3:], registry.get(backend), mesh, cf)[:2])
  return fn(x, gates, idx, *w)


@pytest.mark.parametrize("layout", ["expert:8", "data:2,expert:4", "fsdp:2,expert:2,tensor:2"])
def test_expert_parallel_layer_is_dropless_by_default(layout):
  x, gates, idx, w = _layer_inputs()
  y, dropped = _ep(mesh_of(layout), x, gates, idx, w, 0.0)
  assert int(dropped) == 0
  np.testing.assert_allclose(y, loop_moe(x, idx, gates, *w), rtol=1e-5, atol=1e-5)


def test_expert_parallel_capacity_drops_and_reports():
  mesh = mesh_of("data:2,expert:4")
  x, gates, idx, w = _layer_inputs()
  y, dropped = _ep(mesh, x, gates, idx, w, 0.5)
  # Reference: per token shard (8 of them, 8 tokens each), pairs fill each destination
  # shard's block in GShard order; experts 0-1 live on shard 0, 2-3 on shard 1, ...
  cap = block_rows(8, 2, 4, 0.5)
  keep = np.concatenate([capacity_keep(np.asarray(idx[i:i + 8]) // 2, 4, cap)
                         for i in range(0, 64, 8)])
  assert int(dropped) == int((~keep).sum()) > 0
  np.testing.assert_allclose(y, loop_moe(x, idx, gates, *w, keep=jnp.asarray(keep)),
                             rtol=1e-5, atol=1e-5)


def test_expert_parallel_runs_the_pallas_kernels():
  x, gates, idx, w = _layer_inputs(t=32)
  y, _ = _ep(mesh_of("data:2,expert:4"), x, gates, idx, w, 0.0, backend="pallas_interpret")
  np.testing.assert_allclose(y, loop_moe(x, idx, gates, *w), rtol=1e-5, atol=1e-5)


def test_capacity_all_to_all_bytes_match_the_compiled_program():
  """The plan's formula for the capacity exchange against the all-to-alls XLA actually
  emits (forward only; the dropless rounds: tests/test_rounds.py)."""
  mesh = mesh_of("data:2,expert:4")
  x, gates, idx, w = _layer_inputs()
  fn = jax.jit(lambda *a: expert_parallel_moe(*a[:3], a[3:], registry.get("tiled"), mesh, 1.5)[0])
  hlo = fn.lower(x, gates, idx, *w).compile().as_text()
  total = all_to_all_bytes_sent(hlo, 4)
  assert total == all_to_all_bytes(t_local=8, k=2, d_model=16, n_shards=4, capacity_factor=1.5,
                                   itemsize=4)


# ---------------------------------------------------------------------------------------
# Training on a mesh: sharded checkpoints that resume on another mesh.

def test_training_resumes_sharded_checkpoints_on_another_mesh(tmp_path, small_corpus):
  from tests.data_fixtures import small_data_config, small_model
  from tests.test_train import train_cfg

  model = small_model(n_routed_experts=16, expert_width=16)
  data = small_data_config(small_corpus)

  def run(workdir, mesh, stop_after=None):
    return train_and_evaluate(str(workdir), model, data, train_cfg(steps=4, eval_every=4, checkpoint_every=2),
                              stop_after_steps=stop_after, mesh_cfg=MeshConfig(mesh))

  single = run(tmp_path / "single", "")
  first = run(tmp_path / "meshes", "data:2,expert:4", stop_after=2)
  assert first.status == "stopped"
  second = run(tmp_path / "meshes", "fsdp:2,expert:2,tensor:2")
  assert second.step == 4
  assert second.train_loss == pytest.approx(single.train_loss, rel=1e-4)
  assert second.eval["eval_loss"] == pytest.approx(single.eval["eval_loss"], rel=1e-4)


def test_metrics_show_group_limits_cutting_the_rows_sent(tmp_path, small_corpus):
  """Training on data:2,expert:4 with one expert group per shard: ep_rows_per_pair in
  metrics.jsonl falls as topk_group falls, and the new metrics are written."""
  import json

  from tests.data_fixtures import small_data_config, small_model
  from tests.test_train import train_cfg

  data = small_data_config(small_corpus)
  rows = {}
  for keep in (4, 1):
    model = small_model(n_routed_experts=16, n_activated_experts=4, expert_width=16,
                        router="sigmoid_bias", n_group=0, topk_group=keep, norm_topk_prob=True,
                        seq_balance_alpha=1e-3)
    workdir = tmp_path / f"keep{keep}"
    train_and_evaluate(str(workdir), model, data, train_cfg(steps=2, eval_every=2, log_every=1),
                       mesh_cfg=MeshConfig("data:2,expert:4"))
    logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train = [r for r in logged if "loss" in r and "ep_rows_per_pair" in r.get("layers", {})]
    assert train, logged[0].keys()
    rows[keep] = max(max(r["layers"]["ep_rows_per_pair"]) for r in train)
    assert all(r["layers"]["seq_balance_loss"][0] > 0 for r in train)
  assert rows[1] < rows[4]
  assert rows[1] <= 0.25 + 0.1  # one row per token, but for rows split between two rounds


def test_plan_counts_each_devices_shards():
  """The AOT plan compiles the sharded step from abstract shapes; its per-device parameter
  and optimizer bytes are the rules' shards: routed experts and router columns (axis
  'expert') split 4 ways, the rest whole."""
  from moe.model.counts import count_params
  from moe.train.plan import plan
  mesh = mesh_of("data:2,expert:4")
  p = plan(CFG, TrainConfig(), mesh, batch=8, seq_len=16)
  d, e = CFG.d_model, CFG.n_routed_experts
  split = CFG.n_moe_layers * (e * 3 * d * CFG.expert_width + d * e)
  per_device = 4 * (count_params(CFG).total - split + split // 4)
  assert p.n_devices == 8 and p.tokens_per_device == 8 * 16 // 8
  assert p.param_bytes == per_device
  assert 2 * per_device <= p.optimizer_bytes <= 2 * per_device + 64  # Adam's mu, nu (+ counts)
  assert p.temp_bytes > 0 and p.peak_bytes >= p.argument_bytes + p.temp_bytes
  assert p.all_to_all_bytes > 0


def test_simulated_devices_get_threads_for_their_collectives():
  """XLA:CPU's pool gets 8 threads per simulated device (NPROC) unless told otherwise."""
  import os

  from moe import cpu_threads
  cores = os.cpu_count()
  assert os.environ["NPROC"] == str(max(cores, 8 * len(jax.devices())))  # set on import of moe
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_force_host_platform_device_count=4"}
  assert cpu_threads.reserve_collective_threads(environ=env) == max(cores, 32) == int(env["NPROC"])
  assert cpu_threads.reserve_collective_threads(environ={"JAX_NUM_CPU_DEVICES": "2"}) == max(cores, 16)
  kept = {"XLA_FLAGS": env["XLA_FLAGS"], "NPROC": "12"}
  assert cpu_threads.reserve_collective_threads(environ=kept) is None and kept["NPROC"] == "12"
  assert cpu_threads.reserve_collective_threads(environ={}) is None  # one device: XLA's default


# ---------------------------------------------------------------------------------------
# Group-limited routing meets the exchange.

def _router_layer(**fields):
  from moe.model.moe_layer import MoE

  cfg = ModelConfig(d_model=16, n_heads=4, router="sigmoid_bias", n_routed_experts=16,
                    n_activated_experts=4, expert_width=8, n_group=4, norm_topk_prob=True,
                    **fields)
  return MoE(cfg, nnx.Rngs(0))


def _layer_run(layer, mesh, x):
  """(y, aux, d y.sum / d x) of the MoE layer, on `mesh` (None: one device)."""
  graphdef, state = nnx.split(layer)

  def f(state, x):
    with use_mesh(mesh):
      y, aux = nnx.merge(graphdef, state)(x, jnp.zeros((x.shape[0],), jnp.int32))
    return jnp.sum(y * jnp.cos(x)), (y, aux)

  (_, (y, aux)), dx = jax.jit(jax.value_and_grad(f, argnums=1, has_aux=True))(state, x)
  return np.asarray(y), jax.tree.map(np.asarray, aux), np.asarray(dx)


def test_group_limits_cut_the_rows_sent():
  """Groups = the 4 expert shards: a token's rows reach at most topk_group shards, so the
  rows sent per (token, choice) pair fall with topk_group (K' = 4), and every limit equals
  one device."""
  x = jax.random.normal(jax.random.key(0), (256, 16))
  mesh = mesh_of("data:2,expert:4")
  rows = []
  for keep in (4, 2, 1):
    layer = _router_layer(topk_group=keep)
    y, aux, dx = _layer_run(layer, mesh, x)
    y0, _, dx0 = _layer_run(layer, None, x)
    np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, dx0, rtol=1e-5, atol=1e-6)
    # A token's pairs to one shard share a row, except where a block boundary splits them
    # between two pair rounds: at most one token per shard per extra round, per device.
    extra = 4 * (float(aux["ep_rounds"]) - 1) / (x.shape[0] // 8 * 4)
    assert float(aux["ep_rows_per_pair"]) <= keep / 4 + extra + 1e-6, (keep, aux["ep_rounds"])
    rows.append(float(aux["ep_rows_per_pair"]))
  assert rows[0] > rows[1] > rows[2] >= 0.25


def test_skewed_group_limited_routing_runs_more_rounds_and_equals_one_device():
  """A selection bias that sends most tokens to the first shard's experts overflows the
  blocks: the rounds run more than once and still equal one device."""
  layer = _router_layer(topk_group=2)
  layer.score_bias[...] = jnp.zeros((16,)).at[:4].set(3.0)
  x = jax.random.normal(jax.random.key(1), (64, 16))
  y, aux, dx = _layer_run(layer, mesh_of("data:2,expert:4"), x)
  y0, _, dx0 = _layer_run(layer, None, x)
  assert float(aux["ep_rounds"]) > 1
  np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dx, dx0, rtol=1e-5, atol=1e-6)
