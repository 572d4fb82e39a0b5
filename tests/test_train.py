"""Training: schedule, a short run whose loss drops, exact resume, pre-emption, bad input."""

import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data.config import DataConfig

from moe.train import optim
from moe.train.checkpoint import CheckpointError, Checkpointer
from moe.train.config import TrainConfig
from moe.train.evaluate import evaluate_checkpoint
from moe.train.loop import NonFiniteLossError, train_and_evaluate
from moe.train.restore import restore_run
from moe.train.run_files import (RUN_CONFIG, check_run_configs, read_eval_docs, read_run_configs,
                                 run_configs_dict)
from moe.train.state import create_state
from tests.data_fixtures import small_data_config, small_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_schedule_at_boundaries():
  s = optim.paper_schedule(1.0, total_steps=100, warmup_steps=10)
  assert float(s(0)) == pytest.approx(0.1)
  assert float(s(9)) == pytest.approx(1.0)
  assert float(s(79)) == pytest.approx(1.0)
  assert float(s(80)) == pytest.approx(0.316)
  assert float(s(89)) == pytest.approx(0.316)
  assert float(s(90)) == pytest.approx(0.316 ** 2)
  assert float(s(99)) == pytest.approx(0.316 ** 2)


@pytest.mark.parametrize("model", [dict(), dict(scan_layers=False), dict(n_routed_experts=0, n_shared_experts=0,
                                                                      n_activated_experts=0)],
                         ids=["moe", "unscanned", "dense"])
def test_weight_decay_skips_norm_scales_of_real_models(model):
  """On a real model's state (norm scales stacked to [layers, d]): one AdamW step with zero
  gradients changes exactly the matrices (by weight decay) and leaves every norm scale."""
  from moe.model.decoder import Transformer
  m = Transformer(small_model(**model, first_k_dense_replace=1), nnx.Rngs(0))
  values = lambda: {path: np.array(var[...]) for path, var in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  before = values()
  tx = optim.optimizer_of(train_cfg(warmup_steps=0), nnx.state(m, nnx.Param))
  optimizer = nnx.Optimizer(m, tx, wrt=nnx.Param)
  optimizer.update(m, jax.tree.map(jnp.zeros_like, nnx.state(m, nnx.Param)))
  after = values()
  stacked_scales = 0
  for path, value in before.items():
    is_scale = path[-1] == "scale"
    assert np.array_equal(value, after[path]) == is_scale, path
    stacked_scales += is_scale and value.ndim == 2
  assert stacked_scales >= 2  # [layers, d] scales exist: ndim alone would have decayed them


def train_cfg(**kw):
  return TrainConfig(**{**dict(steps=8, warmup_steps=2, learning_rate=3e-3, log_every=2,
                               eval_every=4, checkpoint_every=4, async_checkpoints=False), **kw})


def run(workdir, corpus, stop_after=None, model=None, **kw):
  return train_and_evaluate(str(workdir), model or small_model(), small_data_config(corpus),
                            train_cfg(**kw), stop_after_steps=stop_after)


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def final_params(workdir, step):
  graphdef, state = create_state(small_model(), train_cfg())
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  _, restored = ckpt.restore(step, nnx.to_pure_dict(state))
  ckpt.close()
  with open(os.path.join(workdir, "checkpoints", str(step), "data", "process_0-of-1.json")) as f:
    return restored, json.load(f)  # the grain iterator's state


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, small_corpus):
  workdir = tmp_path_factory.mktemp("straight")
  result = run(workdir, small_corpus, steps=16, eval_every=8)
  return workdir, result


def test_evaluation_and_logging_keep_their_own_intervals(tmp_path, small_corpus):
  """eval_every 2 with log_every 3 (co-prime): evaluated at 2, 4 and 6, logged at 3 and 6
  too; each row's speed is from completed steps (tokens/s = tokens per step / step time)."""
  workdir = tmp_path / "coprime"
  run(workdir, small_corpus, steps=6, log_every=3, eval_every=2, checkpoint_every=6)
  rows = metrics(workdir)
  assert [r["step"] for r in rows] == [2, 3, 4, 6]
  assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 6]
  data = small_data_config(small_corpus)
  for r in rows:
    assert r["tokens_per_sec"] == pytest.approx(data.batch_size * data.seq_len / r["step_time_s"])
    assert r["tflops_per_sec_per_device"] > 0 and "mfu" not in r  # no known peak on CPU


@pytest.mark.parametrize("every", [1, 2, 5])
def test_logged_speed_is_of_completed_steps_not_dispatch(every):
  """Device-bound steps dispatched asynchronously, as training runs them: the logged intervals
  account for the whole wall-clock time of the steps, and none reads short, at every logging
  interval, though dispatching them takes a small fraction of it (host time between log
  points, the old measure, read dispatch: ~0 for some intervals)."""
  from moe.train.throughput import Throughput

  w = jnp.eye(512) * 0.5
  step = jax.jit(lambda x: jax.lax.fori_loop(0, 40, lambda i, x: jnp.tanh(x @ w) * 2.0, x))
  x = jax.block_until_ready(step(step(jnp.ones((512, 512)))))  # compiled, warm
  n = 20
  start = time.perf_counter()
  speed = Throughput(0, tokens_per_step=1000, flops_per_token=1e9, n_devices=1)
  measured, dispatch = [], 0.0
  for i in range(1, n + 1):
    t = time.perf_counter()
    x = step(x)
    dispatch += time.perf_counter() - t
    if i % every == 0:
      measured.append(speed.measure(i, x))
  elapsed = time.perf_counter() - start
  per_step = elapsed / n
  assert dispatch < 0.2 * elapsed
  times = [m["step_time_s"] for m in measured]
  # The intervals tile the run: their sum is the wall clock up to the last measure (exact, so
  # not at the mercy of this shared machine's noise, which moves single steps by ~10%).
  assert sum(times) * every == pytest.approx(elapsed, rel=0.02, abs=0.01)
  assert min(times) > 0.5 * per_step, (times, per_step)
  assert all(m["tokens_per_sec"] == pytest.approx(1000 / m["step_time_s"]) for m in measured)
  with speed.excluded(x):  # evaluation, saves: waited out and left out
    time.sleep(1.0)
  assert 0.5 * per_step < speed.measure(n + 1, step(x))["step_time_s"] < per_step + 0.5


def _tensorboard_tags(workdir) -> set[str]:
  import tensorflow as tf
  tags = set()
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  return tags


def test_short_run_learns_and_logs(straight_run):
  workdir, result = straight_run
  assert result.status == "finished" and result.step == 16
  rows = metrics(workdir)
  for key in ("step", "loss", "lm_loss", "balance_loss", "tokens_per_sec"):
    assert key in rows[0], key
  assert rows[-1]["lm_loss"] < rows[0]["lm_loss"] - 0.5
  evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
  assert len(evals) == 2 and evals[-1] < evals[0]
  assert len(rows[-1]["layers"]["router_entropy"]) == small_model().n_moe_layers
  assert _tensorboard_tags(workdir) >= {
      "train/loss", "train/learning_rate", "perf/tokens_per_sec", "perf/step_time_s",
      "eval/loss", "moe/layer0/router_entropy", "moe/expert_load", "config/operative_gin"}
  assert os.path.exists(os.path.join(workdir, "operative_config.gin"))
  assert result.eval["eval_loss"] < result.unigram_entropy + 1.5
  with open(os.path.join(workdir, "result.json")) as f:
    env = json.load(f)["environment"]
  assert env["python"] == ".".join(map(str, sys.version_info[:3])) and env["jax"] == jax.__version__


def test_a_finished_run_keeps_its_parameters_and_document_losses(straight_run, tmp_path):
  """final_params.safetensors restores what the last checkpoint holds (a run whose
  checkpoints were deleted is still restored); eval_docs.npz adds up to the final loss."""
  workdir, result = straight_run
  docs = read_eval_docs(str(workdir))
  assert int(docs["step"]) == 16 and (docs["tokens"] > 0).any()
  assert docs["loss"].sum() / docs["tokens"].sum() == pytest.approx(result.eval["eval_loss"], rel=1e-5)
  kept = tmp_path / "kept"
  shutil.copytree(workdir, kept, ignore=shutil.ignore_patterns("checkpoints"))
  from_ckpt, from_file = restore_run(str(workdir)), restore_run(str(kept))
  assert from_file.step == from_ckpt.step == 16
  a, b = nnx.to_pure_dict(from_ckpt.params), nnx.to_pure_dict(from_file.params)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(CheckpointError, match="final parameters are of step 16, not 8"):
    restore_run(str(kept), step=8)


def _train_subprocess(workdir, corpus, extra=()):
  source_dir, data_dir = corpus
  m = small_model()
  args = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}",
          *[f"--gin.model_config.{k}={v!r}" for k, v in dict(
              preset="tiny_deepseekmoe", vocab_size=m.vocab_size, d_model=m.d_model,
              n_layers=m.n_layers, dense_ffn_width=m.dense_ffn_width, expert_width=m.expert_width,
              max_seq_len=m.max_seq_len).items()],
          f"--gin.DataConfig.source_dir={source_dir!r}", f"--gin.DataConfig.data_dir={data_dir!r}",
          "--gin.DataConfig.vocab_size=512", "--gin.DataConfig.seq_len=64",
          "--gin.DataConfig.batch_size=8", "--gin.DataConfig.eval_batches=2",
          "--gin.TrainConfig.steps=16", "--gin.TrainConfig.warmup_steps=2",
          "--gin.TrainConfig.log_every=2", "--gin.TrainConfig.eval_every=8",
          "--gin.TrainConfig.checkpoint_every=4", *extra]
  return args


def test_a_finished_run_started_again_says_there_is_nothing_to_do(straight_run, tmp_path, small_corpus):
  workdir = tmp_path / "again"
  shutil.copytree(straight_run[0], workdir)
  out = subprocess.run(_train_subprocess(workdir, small_corpus, ["--max_new_tokens=0"]), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"restored step 16 from {workdir / 'checkpoints' / '16'}" in out.stdout
  assert "nothing to do: the run finished its 16 steps; raise --gin.TrainConfig.steps" in out.stdout
  assert "nan" not in out.stdout


def test_resume_is_bit_exact(straight_run, tmp_path, small_corpus):
  straight_dir, _ = straight_run
  workdir = tmp_path / "resumed"
  # Process 1 trains 8 of 16 steps and exits; process 2 resumes for the other 8.
  for _ in range(2):
    proc = subprocess.run(_train_subprocess(workdir, small_corpus, ["--stop_after_steps=8"]),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
  a, data_a = final_params(str(straight_dir), 16)
  b, data_b = final_params(str(workdir), 16)
  assert data_a == data_b and data_a  # the same data position, saved
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  la = [(r["step"], r["loss"], r.get("eval_loss")) for r in metrics(straight_dir)]
  lb = [(r["step"], r["loss"], r.get("eval_loss")) for r in metrics(workdir)]
  assert la == lb


def test_sigterm_saves_and_exits_cleanly(tmp_path, small_corpus):
  workdir = tmp_path / "preempt"
  args = _train_subprocess(workdir, small_corpus, ["--gin.TrainConfig.steps=100000",
                                                   "--gin.TrainConfig.checkpoint_every=100000"])
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  log = workdir / "metrics.jsonl"
  while time.time() < deadline and not (log.exists() and log.read_text().strip()):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "preempted at step" in out
  steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
  assert len(steps) == 1 and 0 < steps[0] < 100000


def test_nan_loss_stops_and_keeps_good_checkpoints(tmp_path, small_corpus):
  workdir = tmp_path / "nan"
  run(workdir, small_corpus, steps=4, checkpoint_every=2)
  with pytest.raises(NonFiniteLossError, match=r"not finite at step 5.*last good checkpoint is .*checkpoints/4'?;"):
    run(workdir, small_corpus, steps=40, checkpoint_every=2, learning_rate=float("inf"))
  out = evaluate_checkpoint(str(workdir))
  assert out["step"] == 4 and np.isfinite(out["eval_loss"])


def test_corrupt_checkpoint_is_named_and_earlier_ones_stay_loadable(straight_run, tmp_path):
  import shutil
  workdir = tmp_path / "corrupt"
  shutil.copytree(straight_run[0], workdir)
  ckpts = workdir / "checkpoints"
  latest = max(int(s) for s in os.listdir(ckpts) if s.isdigit())
  for root, _, files in os.walk(ckpts / str(latest) / "state"):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  with pytest.raises(CheckpointError, match=rf"checkpoints/{latest}'.*cannot be restored.*the last "
                                           rf"earlier one is step {latest - 4} \(evaluate it with "
                                           rf"--step={latest - 4};"):
    evaluate_checkpoint(str(workdir))
  assert os.path.isdir(ckpts / str(latest))  # nothing deleted
  for entry in (ckpts / str(latest) / "state").iterdir():  # the arrays gone, the commit marker kept
    if entry.name != "commit_success.txt":
      shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
  with pytest.raises(CheckpointError, match=rf"checkpoints/{latest}'.*cannot be restored "
                                           rf"\(FileNotFoundError: state/_METADATA is missing"):
    evaluate_checkpoint(str(workdir))
  out = evaluate_checkpoint(str(workdir), step=latest - 4)
  assert np.isfinite(out["eval_loss"])
  with pytest.raises(CheckpointError, match="no checkpoint for step 3"):
    evaluate_checkpoint(str(workdir), step=3)
  with pytest.raises(CheckpointError, match="no checkpoint directory"):
    evaluate_checkpoint(str(tmp_path / "nowhere"))


def test_workdir_of_another_model_is_refused(straight_run, small_corpus):
  with pytest.raises(CheckpointError, match=r"different model config.*d_model"):
    run(straight_run[0], small_corpus, model=small_model(d_model=32), steps=20)


def _tree(root) -> dict[str, str]:
  """Every directory and file under root: relative path -> sha256 of its bytes."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    rel = os.path.relpath(dirpath, root)
    out.update({os.path.join(rel, d) + "/": "dir" for d in dirnames})
    for f in filenames:
      with open(os.path.join(dirpath, f), "rb") as fh:
        out[os.path.join(rel, f)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def test_refused_or_failed_restart_leaves_the_run_records(straight_run, tmp_path, small_corpus):
  """A start refused by the workdir guard (another model) and one whose restore fails (a
  broken checkpoint) change nothing in the workdir: operative_config.gin, run_config.json
  and every other file stay byte-identical. Both start from the command line, whose gin
  bindings would make a rewritten operative_config.gin differ."""
  workdir = tmp_path / "records"
  shutil.copytree(straight_run[0], workdir)
  before = _tree(workdir)
  assert "./operative_config.gin" in before and f"./{RUN_CONFIG}" in before
  refused = subprocess.run(_train_subprocess(workdir, small_corpus, ["--gin.model_config.n_heads=2"]),
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert refused.returncode != 0
  assert re.search(r"^error: .*different model config \(fields differ: \['n_heads'\]\)",
                   refused.stderr, re.M), refused.stderr[-3000:]
  assert "Traceback" not in refused.stderr
  assert _tree(workdir) == before

  latest, previous = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())[-1:-3:-1]
  for root, _, files in os.walk(workdir / "checkpoints" / str(latest) / "state"):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  before = _tree(workdir)
  failed = subprocess.run(_train_subprocess(workdir, small_corpus, ["--gin.TrainConfig.steps=20"]),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert failed.returncode != 0
  # One line, naming the checkpoint to fall back to; orbax's threads shut down quietly.
  assert re.search(rf"^error: checkpoint .*checkpoints/{latest}'.*cannot be restored.*the last "
                   rf"earlier one is step {previous} \(evaluate it with --step={previous};",
                   failed.stderr, re.M), failed.stderr[-3000:]
  assert "Traceback" not in failed.stderr
  assert _tree(workdir) == before


def test_unknown_gin_binding_is_a_clear_error(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.train", f"--workdir={tmp_path}",
                         "--gin.TrainConfig.stepz=3"], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0
  assert "stepz" in proc.stderr and "bad gin config" in proc.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_run_configs_recorded_under_old_field_names_still_resume(tmp_path):
  configs = run_configs_dict(small_model(dispatch_backend="fused"), DataConfig(), train_cfg())
  old = dict(configs, model={("dispatch" if k == "dispatch_backend" else k): v
                             for k, v in configs["model"].items()})
  with open(tmp_path / RUN_CONFIG, "w") as f:
    json.dump(old, f)
  assert read_run_configs(str(tmp_path)).model.dispatch_backend == "fused"
  check_run_configs(str(tmp_path), configs)  # the same model: accepted
  other = run_configs_dict(small_model(dispatch_backend="fused", n_layers=3), DataConfig(), train_cfg())
  with pytest.raises(CheckpointError, match=r"fields differ: \['n_layers'\]"):
    check_run_configs(str(tmp_path), other)


def test_runs_of_the_pre_grain_pipeline_are_read_but_not_resumed(tmp_path):
  configs = run_configs_dict(small_model(), DataConfig(), train_cfg())
  old_data = {k: v for k, v in configs["data"].items()
              if k not in ("file_format", "read_threads", "prefetch_batches")}
  with open(tmp_path / RUN_CONFIG, "w") as f:
    json.dump(dict(configs, data=dict(old_data, materialize=None)), f)
  assert read_run_configs(str(tmp_path)).data.seq_len == DataConfig().seq_len  # evaluable
  with pytest.raises(CheckpointError, match=r"fields differ: \['file_format'\]"):
    check_run_configs(str(tmp_path), configs)  # another data stream: not resumed


def test_resume_may_change_how_a_run_computes_not_what(straight_run, small_corpus):
  workdir = str(straight_run[0])
  recorded = read_run_configs(workdir)
  how = run_configs_dict(
      recorded.model.replace(name="other name", remat=True, dispatch_backend="tiled",
                             expert_capacity_factor=2.0),
      dataclasses.replace(recorded.data, eval_batches=1, data_dir="/moved", read_threads=1,
                          prefetch_batches=0),
      train_cfg(steps=40, log_every=5))
  check_run_configs(workdir, how)
  for part, changed, field in [
      ("model", run_configs_dict(recorded.model.replace(expert_width=8), recorded.data, recorded.train), "expert_width"),
      ("data", run_configs_dict(recorded.model, dataclasses.replace(recorded.data, seq_len=32), recorded.train), "seq_len")]:
    with pytest.raises(CheckpointError, match=rf"different {part} config \(fields differ: \['{field}'\]\)"):
      check_run_configs(workdir, changed)


def test_failed_setup_records_no_configs(tmp_path, small_corpus):
  empty = tmp_path / "no_sources"
  empty.mkdir()
  data = small_data_config((str(empty), small_corpus[1]))
  with pytest.raises(ValueError, match=r"has 0 \.py file"):
    train_and_evaluate(str(tmp_path / "run"), small_model(), data, train_cfg())
  assert not os.path.exists(tmp_path / "run" / RUN_CONFIG)
  # The fixed config then starts in the same workdir.
  result = train_and_evaluate(str(tmp_path / "run"), small_model(), small_data_config(small_corpus),
                              train_cfg(steps=2))
  assert result.status == "finished" and os.path.exists(tmp_path / "run" / RUN_CONFIG)


def test_eval_script_honours_data_overrides_and_refuses_others(straight_run):
  workdir = str(straight_run[0])
  base = evaluate_checkpoint(workdir)["eval_loss"]
  one = evaluate_checkpoint(workdir, data_overrides={"eval_batches": 1})["eval_loss"]
  assert one != base  # 1 of the run's 2 eval batches
  cmd = [sys.executable, "-m", "experiments.eval", f"--workdir={workdir}"]
  ok = subprocess.run(cmd + ["--gin.DataConfig.eval_batches=1"], cwd=ROOT, capture_output=True,
                      text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "{'eval_batches': 1}" in ok.stdout and f"validation loss {one:.4f}" in ok.stdout
  with open(os.path.join(workdir, "eval", "step_16.json")) as f:  # into the run's directory
    record = json.load(f)
  assert record["eval_loss"] == pytest.approx(one) and record["data_overrides"] == {"eval_batches": 1}
  plain = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert plain.returncode == 0, plain.stderr[-2000:]
  with open(os.path.join(workdir, "eval", "step_16.json")) as f:
    assert json.load(f)["eval_loss"] == pytest.approx(base)
  import tensorflow as tf  # the run's own evaluation set: also a TensorBoard point at its step
  events = glob.glob(os.path.join(workdir, "tensorboard", "eval", "events.*"))
  points = [(e.step, v.tag) for path in events for e in tf.compat.v1.train.summary_iterator(path)
            for v in e.summary.value]
  assert (16, "eval/loss") in points
  refused = subprocess.run(cmd + ["--gin.model_config.n_layers=1"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
  assert refused.returncode != 0 and "{'model_config': ['n_layers']} do not apply" in refused.stderr


def test_profile_steps_write_a_trace(tmp_path, small_corpus):
  from moe.train.profile import parse_steps
  assert parse_steps("3:5") == (3, 5) and parse_steps("4") == (4, 4)
  for bad in ("5:3", "0:2", "a:b"):
    with pytest.raises(ValueError, match="profile steps"):
      parse_steps(bad)
  result = train_and_evaluate(str(tmp_path), small_model(), small_data_config(small_corpus),
                              train_cfg(steps=3), profile_steps=(2, 3))
  assert result.status == "finished"
  traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files]
  assert any(f.endswith(".xplane.pb") for f in traces) and any(f.endswith(".trace.json.gz") for f in traces)
  # Where the two steps' time went, by the model's scopes.
  from experiments.profile_table import format_table
  from moe.parallel.compiled_cost import scope_component
  from moe.train.plan import COMPONENTS
  from moe.train.profile import breakdown
  b = breakdown(str(tmp_path / "profile"), scope_component(COMPONENTS))
  assert b.steps == 2 and b.wall_s > 0 and b.between_kernels_s >= 0
  assert set(b.components) <= set(COMPONENTS) | {"other"}
  assert {"attention", "routed_experts", "optimizer", "lm_head_loss"} <= set(b.components)
  assert all(v > 0 for v in b.components.values())
  # The step is kernels (each counted, so concurrent ones overlap) plus the gaps between.
  assert sum(b.components.values()) >= b.wall_s - b.between_kernels_s - 1e-9
  assert "| attention |" in format_table(b)


def test_the_selection_bias_is_saved_and_restored(tmp_path, small_corpus):
  """V3's sigmoid_bias router: its selection bias (not a parameter) is checkpointed, so a run
  stopped and resumed has the straight run's bias and loss."""
  from moe.train.loop import train_and_evaluate

  model = small_model(router="sigmoid_bias", n_routed_experts=16, n_activated_experts=4,
                      expert_width=16, n_group=4, topk_group=2, norm_topk_prob=True,
                      bias_update_rate=0.05, expert_balance_alpha=0.0)
  data = small_data_config(small_corpus)
  cfg = train_cfg(steps=4, eval_every=4, checkpoint_every=2, log_every=1)
  straight = train_and_evaluate(str(tmp_path / "a"), model, data, cfg)
  train_and_evaluate(str(tmp_path / "b"), model, data, cfg, stop_after_steps=2)
  resumed = train_and_evaluate(str(tmp_path / "b"), model, data, cfg)
  bias = lambda d: [r["layers"]["score_bias"] for r in metrics(str(tmp_path / d)) if "loss" in r][-1]
  assert np.max(np.abs(bias("a"))) >= 0.05  # the bias moved
  np.testing.assert_array_equal(bias("a"), bias("b"))
  assert resumed.train_loss == straight.train_loss
