"""Parameters-only restore onto a mesh (from abstract shapes, no optimizer state), and
evaluation and analyses there, against one device and the raw checkpoint."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from data.input_pipeline import make_datasets
from moe.parallel import rules
from moe.parallel.mesh import MeshConfig, make_mesh
from moe.research import analyses, report
from moe.train.checkpoint import Checkpointer
from moe.train.config import TrainConfig
from moe.train.evaluate import evaluate_checkpoint
from moe.train.loop import train_and_evaluate
from moe.train.restore import MODEL, abstract_model, restore_run
from tests.data_fixtures import small_data_config, small_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUT = "fsdp:2,expert:2,tensor:2"  # every parameter rule in play: embed, expert, widths
STEP = 8  # the run's one checkpoint


@pytest.fixture(scope="module")
def run16(tmp_path_factory, small_corpus):
  """An 8-step run of a small DeepSeekMoE with 16 routed experts (they split over `expert`)."""
  workdir = tmp_path_factory.mktemp("restore_run")
  train_and_evaluate(str(workdir), small_model(n_routed_experts=16),
                     small_data_config(small_corpus, eval_batches=2),
                     TrainConfig(steps=STEP, warmup_steps=1, learning_rate=3e-3, log_every=STEP,
                                 eval_every=STEP, checkpoint_every=STEP, async_checkpoints=False))
  return str(workdir)


def flat(tree) -> dict[tuple[str, ...], np.ndarray]:
  """{path of str keys: value} of a nested dict (int and str keys alike)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(str(k.key) for k in path): np.asarray(x) for path, x in leaves}


@pytest.mark.filterwarnings("ignore:Sharding info not provided")  # the raw read below
def test_params_restore_into_the_rules_shards_without_optimizer_state(run16):
  mesh = make_mesh(MeshConfig(LAYOUT))
  sharded = restore_run(run16, mesh=mesh)
  one = restore_run(run16)
  assert sharded.step == one.step == STEP and sharded.mesh is mesh and one.mesh is None

  # Where the rules put each parameter: no leaf is left whole where its axes split.
  variables = nnx.to_flat_state(sharded.params)
  assert all(isinstance(var, nnx.Param) for _, var in variables)
  split = 0
  for path, var in variables:
    x = var[...]
    want = rules.partition_spec(var.get_metadata()["axes"], x.shape, mesh)
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, want), x.ndim), (path, x.sharding, want)
    if any(want):
      assert not x.sharding.is_fully_replicated, path
      assert np.prod(x.addressable_shards[0].data.shape) < x.size, path
      split += 1
  assert split == len(variables)  # every parameter has an embed axis (fsdp) at least
  specs = {path[-2:]: var[...].sharding.spec for path, var in variables}
  assert specs[("experts", "w_gate")] == P(None, "expert", "fsdp", "tensor")
  assert specs[("attn", "wq")] == P(None, "fsdp", "tensor", None)
  assert specs[("lm_head",)] == P("fsdp", "tensor")

  # Bit-exact: the mesh restore, the one-device restore and the checkpoint's own arrays.
  with ocp.PyTreeCheckpointer() as c:
    raw = c.restore(os.path.join(run16, "checkpoints", str(STEP), "state"))
  assert set(raw) == {"0", "1"}  # (model, optimizer) on disk
  want = flat(raw["0"])
  for restored in (sharded, one):
    got = flat(nnx.to_pure_dict(restored.params))
    assert got.keys() == want.keys()
    for key, value in want.items():
      assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key
  # Only the model's entry is read: the optimizer's is not in what comes back.
  _, params = abstract_model(sharded.model_cfg)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.to_pure_dict(params))
  ckpt = Checkpointer(os.path.join(run16, "checkpoints"), async_save=False)
  try:
    _, restored = ckpt.restore_subtree(None, {MODEL: target})
  finally:
    ckpt.close()
  assert set(restored) == {MODEL}


def test_evaluation_and_analyses_on_a_mesh_equal_one_device(run16, tmp_path, monkeypatch):
  one = evaluate_checkpoint(run16)
  sharded = evaluate_checkpoint(run16, mesh_cfg=MeshConfig(LAYOUT))
  assert sharded["step"] == one["step"] == STEP
  assert sharded["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-5)
  np.testing.assert_allclose(sharded["layers"]["load"], one["layers"]["load"], atol=1e-5)
  # It ran on the mesh: the device-level balance loss groups experts by expert shard by
  # default, one group (a constant 1, up to float sums) on one device, two on this mesh
  # (1.003-1.004 here).
  np.testing.assert_allclose(one["layers"]["device_balance_loss"], 1.0, atol=1e-6)
  assert np.all(np.abs(sharded["layers"]["device_balance_loss"] - 1.0) > 1e-4)

  # An intervention traced on the mesh (shared experts off, K'+1 routed) against one device.
  run_one, run_mesh = restore_run(run16), restore_run(run16, mesh=make_mesh(MeshConfig(LAYOUT)))
  batches = make_datasets(run_one.data_cfg, run_one.model_cfg.vocab_size).eval_batches
  off_one = analyses.without_shared_experts(run_one, batches)
  off_mesh = analyses.without_shared_experts(run_mesh, batches)
  assert off_mesh["loss"] == pytest.approx(one["eval_loss"], abs=1e-5)
  assert off_mesh["loss_without_shared"] == pytest.approx(off_one["loss_without_shared"], abs=1e-5)
  # ... and the intervention changed the model by well over that tolerance (a young model
  # leans little on its FFNs: ~3e-4 here).
  assert abs(off_one["loss_without_shared"] - off_one["loss"]) > 1e-4

  kw = dict(analyses=("load", "categories"), max_tokens=256, log=lambda *_: None)
  a = report.analyze({"run": run16}, str(tmp_path / "one"), **kw)["run"]
  runs = []
  monkeypatch.setattr(report, "restore_run", lambda *args: runs.append(restore_run(*args)) or runs[-1])
  b = report.analyze({"run": run16}, str(tmp_path / "mesh"), mesh_cfg=MeshConfig(LAYOUT), **kw)["run"]
  assert dict(runs[0].mesh.shape) == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
  assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
  np.testing.assert_allclose(b["load"], a["load"], atol=1e-5)
  counts_a, counts_b = np.array(a["categories"]["counts"]), np.array(b["categories"]["counts"])
  assert counts_a.sum() == counts_b.sum() > 0
  # Routing may flip where two experts' scores tie to rounding; nearly all choices agree.
  assert np.abs(counts_a - counts_b).sum() <= 0.01 * counts_a.sum()


def test_eval_script_takes_a_mesh(run16):
  cmd = [sys.executable, "-m", "experiments.eval", f"--workdir={run16}"]
  one = evaluate_checkpoint(run16)["eval_loss"]
  ok = subprocess.run(cmd + [f"--mesh={LAYOUT}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert f"mesh: {LAYOUT}" in ok.stdout
  printed = float(re.search(r"validation loss ([0-9.]+)", ok.stdout).group(1))
  assert printed == pytest.approx(one, abs=1e-4)  # printed to 4 decimals
  bad = subprocess.run(cmd + ["--gin.MeshConfig.shape='expert:3'"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode != 0 and "bad mesh" in bad.stderr and "expert:3" in bad.stderr
