"""Two processes x 4 CPU devices, joined by jax.distributed, train on one 8-device mesh: each
host reads its own documents, sharded orbax checkpoints (and each host's data position) are
written and restored by both processes, and a resumed run matches a straight one. Hosts
whose held-out shards pack into different numbers of batches still evaluate together."""

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from data.input_pipeline import make_datasets, padding_batch
from data.stdlib_corpus import source_files, split_of
from moe.train.evaluate import evaluate
from moe.train.loop import train_and_evaluate
from moe.train.restore import restore_run
from moe.train.steps import make_steps
from tests.data_fixtures import small_data_config, small_model
from tests.test_train import ROOT, _train_subprocess, train_cfg

MODEL = dict(n_routed_experts=16, expert_width=16)
MESH = "data:2,expert:4"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _four_devices() -> str:
  """This process's XLA_FLAGS (collective timeouts included) with 4 devices per host."""
  return re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")) + \
      " --xla_force_host_platform_device_count=4"


def _start_hosts(args):
  """`args` run as processes 0 and 1 of one jax.distributed job, 4 CPU devices each."""
  port = _free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=_four_devices(),
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def _start_two_hosts(workdir, corpus, extra):
  return _start_hosts(_train_subprocess(workdir, corpus, [
      "--distributed", f"--mesh={MESH}", "--gin.TrainConfig.steps=4",
      "--gin.TrainConfig.checkpoint_every=2", "--gin.TrainConfig.eval_every=4",
      *[f"--gin.model_config.{k}={v}" for k, v in MODEL.items()], *extra]))


def _finish(procs, timeout=600):
  """Both processes' (stdout, stderr), each having exited 0; killed if they outlive timeout."""
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def _two_hosts(workdir, corpus, extra):
  return _finish(_start_two_hosts(workdir, corpus, extra))


def test_two_processes_resume_like_a_straight_run(tmp_path, small_corpus):
  workdir = tmp_path / "two_hosts"
  first = _two_hosts(workdir, small_corpus, ["--stop_after_steps=2"])
  assert all("stopped at step 2" in out for out, _ in first)
  second = _two_hosts(workdir, small_corpus, [])
  assert all("finished at step 4" in out for out, _ in second)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  saved = os.listdir(workdir / "checkpoints" / "4" / "data")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(saved)
  _two_hosts(tmp_path / "straight", small_corpus, [])
  results = []
  for w in (workdir, tmp_path / "straight"):
    with open(w / "result.json") as f:
      results.append(json.load(f))
  assert results[0]["train_loss"] == results[1]["train_loss"]
  assert results[0]["eval_loss"] == results[1]["eval_loss"]


def test_sigterm_on_one_host_stops_both_at_the_same_step(tmp_path, small_corpus):
  """Only host 0 is pre-empted; both hosts agree on the step, save it once, exit cleanly."""
  workdir = tmp_path / "preempt_one"
  procs = _start_two_hosts(workdir, small_corpus, ["--gin.TrainConfig.steps=100000",
                                                   "--gin.TrainConfig.checkpoint_every=100000",
                                                   "--gin.TrainConfig.log_every=1"])
  try:
    for line in procs[0].stdout:  # wait until training runs
      if line.startswith("step "):
        break
    procs[0].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=600) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  stopped = [re.search(r"preempted at step (\d+)", out) for out, _ in outs]
  assert all(stopped), outs
  step = int(stopped[0].group(1))
  assert int(stopped[1].group(1)) == step and step < 100000
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(step)]


def _unequal_eval_corpus(root, small_corpus):
  """(source_dir, data_dir): small_corpus's training modules and a held-out split of two
  documents, one per host of two: 45 short lines (about 6 rows of 64 tokens) and 100 (13)."""
  src = os.path.join(root, "src")
  for rel in source_files(small_corpus[0]):
    if split_of(rel) == "train":
      os.makedirs(os.path.dirname(os.path.join(src, rel)), exist_ok=True)
      shutil.copy(os.path.join(small_corpus[0], rel), os.path.join(src, rel))
  names = (n for n in (f"held_out_{i}.py" for i in range(1000)) if split_of(n) == "validation")
  for lines in (45, 100):
    with open(os.path.join(src, next(names)), "w") as f:
      f.write("".join(f"x{i} = {i}\n" for i in range(lines)))
  os.makedirs(os.path.join(root, "tfds"))
  return src, os.path.join(root, "tfds")


def _shards(cfg, vocab_size):
  """Each of two hosts' eval batches, as make_datasets builds them on that host."""
  out = []
  for i in range(2):
    data = make_datasets(cfg, vocab_size, i, 2)
    data.train.close()
    out.append(data.eval_batches)
  return out


def test_hosts_with_unequal_eval_shards_evaluate_together(tmp_path, small_corpus):
  """One host packs more eval batches than the other (batch 8), or none at all (batch 16):
  the two-process evaluation still finishes, and its loss is the token-weighted NLL of
  exactly the batches both hosts built, computed in one process; so are its routing
  statistics, the other host's padding rows counting nowhere."""
  corpus = _unequal_eval_corpus(tmp_path, small_corpus)
  workdir = tmp_path / "run"
  cfg = small_data_config(corpus, eval_batches=8)
  train_and_evaluate(str(workdir), small_model(**MODEL), cfg, train_cfg(steps=2))
  run = restore_run(str(workdir))
  steps = make_steps(run.graphdef, run.params)

  for batch_size in (8, 16):
    shards = _shards(dataclasses.replace(cfg, batch_size=batch_size), run.model_cfg.vocab_size)
    counts = sorted(len(s) for s in shards)
    assert counts[0] < counts[1] and counts[0] == (1 if batch_size == 8 else 0), counts
    sums = [steps.eval(run.params, b)[:2] for s in shards for b in s]
    reference = sum(float(nll) for nll, _ in sums) / sum(float(n) for _, n in sums)

    out_json = tmp_path / f"eval_{batch_size}.json"
    outs = _finish(_start_hosts([
        sys.executable, "-m", "experiments.eval", "--distributed", f"--workdir={workdir}",
        f"--mesh={MESH}", f"--json_out={out_json}", f"--gin.DataConfig.batch_size={batch_size}"]),
        timeout=240)
    with open(out_json) as f:
      out = json.load(f)
    assert out["eval_loss"] == pytest.approx(reference, rel=1e-5)
    assert all(f"validation loss {out['eval_loss']:.4f}" in o for o, _ in outs)
    # Routing statistics: of every global batch, the padding rows of the host with fewer
    # batches (agree_eval_batches) left out by construction.
    pad = padding_batch(batch_size // 2, cfg.seq_len)
    full = [{k: np.concatenate([s[i][k] if i < len(s) else pad[k] for s in shards]) for k in pad}
            for i in range(counts[1])]
    layers = evaluate(steps, run.params, full)["layers"]
    del layers["device_balance_loss"]  # of the mesh's expert shards: 1 group on one device
    for k, v in layers.items():
      np.testing.assert_allclose(out["layers"][k], v, rtol=1e-5, atol=1e-6, err_msg=k)
