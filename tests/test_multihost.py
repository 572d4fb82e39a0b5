"""Two processes x 4 CPU devices, joined by jax.distributed, train on one 8-device mesh: each
host reads its own documents, sharded orbax checkpoints (and each host's data position) are
written and restored by both processes, and a resumed run matches a straight one."""

import json
import os
import re
import signal
import socket
import subprocess

from tests.test_train import ROOT, _train_subprocess

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


def _start_two_hosts(workdir, corpus, extra):
  port = _free_port()
  args = _train_subprocess(workdir, corpus, [
      "--distributed", f"--mesh={MESH}", "--gin.TrainConfig.steps=4",
      "--gin.TrainConfig.checkpoint_every=2", "--gin.TrainConfig.eval_every=4",
      *[f"--gin.model_config.{k}={v}" for k, v in MODEL.items()], *extra])
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=_four_devices(),
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def _two_hosts(workdir, corpus, extra):
  procs = _start_two_hosts(workdir, corpus, extra)
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


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
