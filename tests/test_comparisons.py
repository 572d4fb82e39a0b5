"""A sweep's declared comparisons (per-seed differences, t and document-bootstrap intervals,
Holm-corrected calls) from tiny fake run directories, its learning-rate step with a fake
trainer, per-document losses from packed rows, and the sweep file's new keys checked."""

import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from data.packing import lm_example
from moe.research import comparisons, lr_search, sweep
from moe.train.evaluate import split_documents
from moe.train.run_files import RESULT, read_eval_docs, write_eval_docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Final validation losses per seed 0 / 1 / 2: ds - gs is docs/results.md's DeepSeekMoE -
# GShard (+.047 / +.018 / +.039), ds - dense its DeepSeekMoE - Dense (-.026 / -.044 / -.047),
# dense - hash a steady +.100 / +.101 / +.102.
LOSSES = {"gs": [2.372, 2.357, 2.446]}
LOSSES["ds"] = list(np.add(LOSSES["gs"], [0.047, 0.018, 0.039]))
LOSSES["dense"] = list(np.add(LOSSES["ds"], [0.026, 0.044, 0.047]))
LOSSES["hash"] = list(np.subtract(LOSSES["dense"], [0.100, 0.101, 0.102]))
PAIRS = [("ds", "gs"), ("ds", "dense"), ("dense", "hash")]
DOCS = 30


def fake_sweep(workdir, docs=True):
  """result.json and eval_docs.npz of model x SEED runs: each document's loss per token is
  the run's validation loss plus a model's own pattern of token-weighted mean zero, so
  sum(loss) / sum(tokens) is the run's loss."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(50, 500, DOCS).astype(np.float64)
  rows = []
  for model, losses in LOSSES.items():
    pattern = rng.normal(0, 0.01, DOCS)
    pattern -= (pattern * tokens).sum() / tokens.sum()
    for seed, loss in enumerate(losses):
      name = f"{model},SEED={seed}"
      run = os.path.join(workdir, name)
      os.makedirs(run)
      with open(os.path.join(run, RESULT), "w") as f:
        json.dump({"status": "finished", "step": 10, "eval_loss": loss}, f)
      if docs:
        write_eval_docs(run, {"loss": tokens * (loss + pattern), "tokens": tokens,
                              "fingerprint": np.arange(DOCS, dtype=np.uint32)}, 10)
      rows.append({"variant": name, "status": "finished", "eval_loss": loss})
  rows.append({"variant": "gs,SEED=3", "status": "started", "eval_loss": None})  # unfinished: left out
  return rows


def test_comparison_table_from_fake_runs(tmp_path):
  rows = fake_sweep(str(tmp_path))
  results = {(c.a, c.b): c for c in comparisons.compare(rows, str(tmp_path), PAIRS, resamples=2000)}
  ds_gs, ds_dense, dense_hash = (results[p] for p in PAIRS)
  assert ds_gs.seeds == ["0", "1", "2"]
  assert ds_gs.paired.diffs == pytest.approx((0.047, 0.018, 0.039))
  assert ds_gs.paired.p == pytest.approx(0.05696, abs=1e-4)  # test_stats: t = 4.01, 2 df
  assert ds_dense.paired.p == pytest.approx(0.02714, abs=1e-4)  # t = -5.95, 2 df
  # Holm over m = 3: dense - hash (p ~ 3e-5) at .05/3, then ds - dense at .05/2 (x2 = .054 > .05):
  # it fails, and so does ds - gs after it, though ds - dense alone would pass at .05.
  assert dense_hash.holm_p < 0.001 and dense_hash.holm_level == pytest.approx(1 - 0.05 / 3)
  assert ds_dense.holm_p == pytest.approx(2 * ds_dense.paired.p)
  assert ds_gs.holm_p == pytest.approx(ds_gs.paired.p)  # the running maximum
  assert [c.called for c in (ds_gs, ds_dense, dense_hash)] == [False, False, True]
  assert ds_dense.holm_ci[0] < 0 < ds_dense.holm_ci[1] and dense_hash.holm_ci[0] > 0
  # The bootstrap's estimate is the mean per-seed difference (the documents add up to the loss).
  for c in results.values():
    assert c.boot.estimate == pytest.approx(c.paired.mean) and c.boot.documents == DOCS
  assert dense_hash.boot.ci[0] > 0.09 and dense_hash.boot_holm_p < 0.05

  text = comparisons.markdown(list(results.values()))
  lines = text.splitlines()
  assert lines[0].startswith("| A - B | seeds | per seed | mean | 95% CI (t) |")
  assert "| ds - gs | 3 | +0.0470 / +0.0180 / +0.0390 | +0.0347 | [-0.0025, +0.0719] | 0.057 |" in lines[2]
  assert lines[2].endswith("| not real |") and lines[4].endswith("| real (A higher) |")
  assert "at 98.33%" in lines[4]
  assert "Holm-Bonferroni over the m = 3 declared comparisons" in text and f"over the {DOCS} held-out" in text

  out = tmp_path / "out"
  comparisons.write(rows, str(tmp_path), str(out), PAIRS)
  saved = json.loads((out / "comparisons.json").read_text())
  assert [c["called"] for c in saved] == [False, False, True] and (out / "comparisons.md").exists()


def test_comparisons_without_document_losses_or_with_other_documents(tmp_path):
  rows = fake_sweep(str(tmp_path), docs=False)
  c = comparisons.compare(rows, str(tmp_path), [("dense", "hash")])[0]
  assert c.boot is None and c.boot_note == "no document losses (eval_docs.npz) in 6 of its 6 runs"
  assert c.called  # on the t test alone, and the table says so
  assert "real (A higher; t only: no document losses)" in comparisons.markdown([c])
  brief = comparisons.markdown([c, c], footnote=False)
  assert brief.endswith("\n\nNo bootstrap: every comparison: no document losses (eval_docs.npz) in 6 of its 6 runs.")
  assert "Holm-Bonferroni" not in brief
  run = tmp_path / "hash,SEED=1"
  write_eval_docs(str(run), {"loss": np.ones(3), "tokens": np.ones(3), "fingerprint": np.arange(3)}, 10)
  for name in ("dense,SEED=0", "dense,SEED=1", "dense,SEED=2", "hash,SEED=0", "hash,SEED=2"):
    write_eval_docs(str(tmp_path / name), {"loss": np.ones(3), "tokens": np.ones(3),
                                           "fingerprint": np.array([0, 1, 7])}, 10)
  c = comparisons.compare(rows, str(tmp_path), [("dense", "hash")])[0]
  assert c.boot is None and "held-out documents of hash,SEED=1 differ" in c.boot_note
  one = comparisons.compare(rows[:1] + rows[3:4], str(tmp_path), [("gs", "ds")])[0]  # seed 0 only
  assert one.seeds == ["0"] and one.paired.p is None and not one.called
  assert "| untested |" in comparisons.markdown([one])
  assert comparisons.compare(rows, str(tmp_path), [("gs", "nope")])[0].paired is None


def test_documents_are_split_at_eos_across_rows():
  """Row 0: doc 0 (5 6 EOS), doc 1 starts (7 8 9); row 1: doc 1 ends (4 EOS), doc 2 (3 EOS),
  padding. A position's loss goes to the document of its input token."""
  eos = 1
  rows = [np.array([[5, 6, 1, 7, 8, 9]]), np.array([[4, 1, 3, 1, 0, 0]])]
  segs = [np.array([[1, 1, 1, 2, 2, 2]]), np.array([[1, 1, 2, 2, 0, 0]])]
  batches = []
  for tokens, seg in zip(rows, segs):
    _, weights = lm_example(tokens, seg)
    batches.append({"inputs": tokens, "segment_ids": seg, "weights": weights})
  nll = [np.array([[1.0, 2, 3, 4, 5, 6]]) * batches[0]["weights"],
         np.array([[10.0, 20, 30, 40, 50, 60]]) * batches[1]["weights"]]
  docs = split_documents(batches, nll, eos)
  assert docs["loss"].tolist() == [3.0, 19.0, 30.0]
  assert docs["tokens"].tolist() == [2.0, 3.0, 1.0]
  crc = lambda ids: zlib.crc32(np.array(ids, np.int32).tobytes())
  assert docs["fingerprint"].tolist() == [crc([5, 6, 1]), crc([7, 8, 9, 4, 1]), crc([3, 1])]


def lr_sweep_file(tmp_path, **extra):
  spec = {"variants": {"a": {"bindings": ["X.y = 1"]}, "b": {}}, "product": {"SEED": [0, 1, 2]},
          "lr_grid": {"values": [0.001, 0.003, 0.01], "seeds": [0, 1], "bindings": ["TrainConfig.steps = 5"]},
          "comparisons": [["a", "b"]], **extra}
  path = tmp_path / "s.json"
  path.write_text(json.dumps(spec))
  return str(path)


class FakeTrainer:
  """subprocess.run for the sweep's training commands: writes result.json with a loss that
  is lowest at 3e-3 for model a and at 1e-2 (the grid's edge) for b; fails b at 1e-3, seed 1."""

  def __init__(self):
    self.calls = []

  def __call__(self, cmd, cwd=None, stdout=None, stderr=None, **kwargs):
    workdir = next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir="))
    binds = dict(a[len("--gin_bindings="):].split(" = ") for a in cmd if a.startswith("--gin_bindings="))
    self.calls.append((os.path.basename(workdir), binds))
    lr, seed = float(binds["TrainConfig.learning_rate"]), int(binds["SEED"])
    model = sweep.model_of(os.path.basename(workdir))[0].split(",")[0]
    if model == "b" and lr == 0.001 and seed == 1:
      return subprocess.CompletedProcess(cmd, 1)
    best = 0.003 if model == "a" else 0.01
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, RESULT), "w") as f:
      json.dump({"status": "finished", "step": 5, "eval_loss": 3 + np.log10(lr / best) ** 2 + 0.01 * seed}, f)
    return subprocess.CompletedProcess(cmd, 0)


def test_learning_rate_step_picks_each_models_rate_and_resumes(tmp_path):
  spec = sweep.load_sweep_spec(lr_sweep_file(tmp_path))
  assert spec.comparisons == (("a", "b"),) and spec.lr_grid.seeds == (0, 1)
  variants = sweep.with_overrides(spec.variants, bindings=["TrainConfig.steps = 50"])
  workdir, fake, log = str(tmp_path / "w"), FakeTrainer(), []
  mains, failed, table = lr_search.run_step(variants, spec.lr_grid, workdir, log=log.append, runner=fake)
  assert len(fake.calls) == 2 * 3 * 2  # models x rates x seeds
  name, binds = fake.calls[1]
  assert name == "a,lr=0.001,SEED=1" and binds["SEED"] == "1" and binds["X.y"] == "1"
  pilot = next(v for v in lr_search.pilots(variants, spec.lr_grid) if v.name == name)
  # The grid's budget after the sweep's (and the command line's) bindings; no SEED=0 left.
  assert pilot.bindings == ("X.y = 1", "TrainConfig.steps = 50", "TrainConfig.steps = 5", "SEED = 1",
                            "TrainConfig.learning_rate = 0.001")
  assert table["a"]["chosen"] == 0.003 and not table["a"]["at_edge"]
  assert table["b"]["chosen"] == 0.01 and table["b"]["at_edge"]
  assert table["b"]["means"]["0.001"] is None and table["b"]["losses"]["0.001"][1] is None
  assert table["a"]["means"]["0.003"] == pytest.approx(3.005)
  assert failed == ["b,lr=0.001,SEED=1"]
  assert [v.name for v in mains] == [v.name for v in variants]
  assert mains[0].bindings[-1] == "TrainConfig.learning_rate = 0.003"
  assert mains[3].bindings[-1] == "TrainConfig.learning_rate = 0.01"
  assert any("learning rate 0.01 (at the edge of the grid" in line for line in log)
  saved = lr_search.read_chosen(workdir)
  assert saved["a"]["chosen"] == 0.003 and saved["b"]["grid"] == [0.001, 0.003, 0.01]
  text = lr_search.markdown(table)
  low = [3 + np.log10(0.001 / 0.003) ** 2 + 0.01 * seed for seed in (0, 1)]
  assert f"| a | {np.mean(low):.4f} ({low[0]:.4f} / {low[1]:.4f}) | 3.0050 (3.0000 / 3.0100) |" in text
  assert text.splitlines()[3].endswith("| 0.01 (edge) |")

  again = FakeTrainer()  # finished pilots are skipped; the failed one runs again (and fails)
  lr_search.run_step(variants, spec.lr_grid, workdir, log=log.append, runner=again)
  assert [c[0] for c in again.calls] == ["b,lr=0.001,SEED=1"]
  nothing = FakeTrainer()
  _, _, collected = lr_search.run_step(variants, spec.lr_grid, workdir, log=log.append, runner=nothing, run=False)
  assert not nothing.calls and collected["a"]["chosen"] == 0.003

  # Every rate of a model failing leaves its runs out, named.
  for rate in ("0.003", "0.01"):
    os.remove(os.path.join(workdir, "lr_search", f"b,lr={rate},SEED=0", RESULT))
  mains, failed, _ = lr_search.run_step(variants, spec.lr_grid, workdir, log=log.append, runner=nothing, run=False)
  assert [v.name for v in mains] == ["a,SEED=0", "a,SEED=1", "a,SEED=2"]
  assert failed == ["b,SEED=0", "b,SEED=1", "b,SEED=2"]


@pytest.mark.parametrize("extra, error", [
    ({"comparisons": [["a", "c"]]}, "comparison \\['a', 'c'\\] names 'c', which is not a model of the sweep; its models: \\['a', 'b'\\]"),
    ({"comparisons": [["a,SEED=0", "b"]]}, "names 'a,SEED=0', which is not a model"),
    ({"comparisons": [["a", "a"]]}, "must be a pair of two different model names"),
    ({"comparisons": [["a", "b"], ["a", "b"]]}, "a comparison repeats"),
    ({"comparisons": "a-b"}, "'comparisons' must be a list"),
    ({"lr_grid": {"values": []}}, "'values' must be distinct positive learning rates"),
    ({"lr_grid": {"values": [0.001, -1]}}, "'values' must be distinct positive"),
    ({"lr_grid": {"values": [0.001], "seeds": [0.5]}}, "'seeds' must be a non-empty list of integers"),
    ({"lr_grid": {"values": [0.001], "steps": 5}}, "'lr_grid' must be an object"),
    ({"lr_grid": {"values": [0.001], "widen": -1}}, "'widen' must be a non-negative integer"),
    ({"lr_grid": {"values": [0.001], "bindings": ["TrainConfig.learning_rate = 1.0"]}}, "may not bind"),
])
def test_bad_comparisons_and_lr_grid_are_clear_errors(tmp_path, extra, error):
  with pytest.raises(sweep.SweepError, match=error):
    sweep.load_sweep_spec(lr_sweep_file(tmp_path, **extra))


def test_eval_docs_round_trip(tmp_path):
  write_eval_docs(str(tmp_path), {"loss": np.array([1.5]), "tokens": np.array([3.0]),
                                  "fingerprint": np.array([7], np.uint32)}, 12)
  docs = read_eval_docs(str(tmp_path))
  assert int(docs["step"]) == 12 and docs["loss"].tolist() == [1.5] and docs["fingerprint"].dtype == np.uint32
  assert read_eval_docs(str(tmp_path / "none")) is None


def test_sweep_script_reports_rates_and_comparisons_of_finished_runs(tmp_path):
  """experiments.sweep --collect_only and --print_commands on a sweep with an lr_grid and
  comparisons whose runs (fake: result.json, eval_docs.npz) are all there: nothing runs."""
  path, workdir = lr_sweep_file(tmp_path), tmp_path / "w"
  spec = sweep.load_sweep_spec(path)
  fake = FakeTrainer()
  for v in lr_search.pilots(spec.variants, spec.lr_grid):
    fake(sweep.command(v, str(workdir / "lr_search")))
  tokens = np.full(4, 100.0)
  for v in spec.variants:
    model, seed = sweep.model_of(v.name)
    loss = 3.0 + (0.1 if model == "a" else 0.0) + 0.01 * int(seed)
    os.makedirs(workdir / v.name)
    (workdir / v.name / RESULT).write_text(json.dumps({"status": "finished", "step": 5, "eval_loss": loss}))
    write_eval_docs(str(workdir / v.name), {"loss": tokens * loss, "tokens": tokens,
                                            "fingerprint": np.arange(4, dtype=np.uint32)}, 5)
  args = [sys.executable, "-m", "experiments.sweep", f"--sweep={path}", f"--workdir={workdir}"]
  out = subprocess.run(args + ["--collect_only"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]  # collecting: the failed pilot is not a failure
  assert "learning rates:\n| model | lr=0.001 | lr=0.003 | lr=0.01 | chosen |" in out.stdout
  assert "comparisons:\n| A - B |" in out.stdout and "| a - b | 3 | +0.1000 / +0.1000 / +0.1000 |" in out.stdout
  results = workdir / "s.results"
  assert (results / "learning_rates.md").exists() and (results / "comparisons.json").exists()
  printed = subprocess.run(args + ["--print_commands"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  lines = printed.stdout.strip().splitlines()
  assert len(lines) == 12 + 6 and "lr_search/a,lr=0.001,SEED=0" in lines[0]
  assert lines[12].endswith("'--gin_bindings=SEED = 0' '--gin_bindings=TrainConfig.learning_rate = 0.003' "
                            "--max_new_tokens=0")
  assert lines[-1].endswith("'--gin_bindings=TrainConfig.learning_rate = 0.01' --max_new_tokens=0")


def test_a_grid_on_the_sweeps_budget_gives_its_pilots_as_seed_runs(tmp_path):
  """Without grid bindings the pilot at the chosen rate and seed 0 is the sweep's seed-0 run:
  copied, not trained again; the other seeds train."""
  spec = sweep.load_sweep_spec(lr_sweep_file(tmp_path, lr_grid={"values": [0.001, 0.003, 0.01], "seeds": [0]}))
  workdir, fake, log = str(tmp_path / "w"), FakeTrainer(), []
  mains, _, table = lr_search.run_step(spec.variants, spec.lr_grid, workdir, log=log.append, runner=fake)
  assert len(fake.calls) == 2 * 3 and table["a"]["chosen"] == 0.003
  assert sweep.is_finished(os.path.join(workdir, "a,SEED=0")) and sweep.is_finished(os.path.join(workdir, "b,SEED=0"))
  assert not os.path.exists(os.path.join(workdir, "a,SEED=1"))
  assert "[a,SEED=0] is the finished pilot a,lr=0.003,SEED=0 (same config): copied, not retrained" in log
  fake.calls.clear()
  sweep.run_sweep(mains, workdir, log=log.append, runner=fake)
  assert sorted(c[0] for c in fake.calls) == ["a,SEED=1", "a,SEED=2", "b,SEED=1", "b,SEED=2"]

  # A grid with its own budget trains a different config: nothing is adopted.
  spec = sweep.load_sweep_spec(lr_sweep_file(tmp_path))
  workdir = str(tmp_path / "short")
  lr_search.run_step(spec.variants, spec.lr_grid, workdir, log=log.append, runner=FakeTrainer())
  assert not os.path.exists(os.path.join(workdir, "a,SEED=0"))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_parallel_sweep_runs_at_once_each_on_its_own_cores(tmp_path):
  import threading
  both = threading.Barrier(2, timeout=60)  # fails unless two runs are in flight together
  seen = []

  def runner(cmd, cwd=None, stdout=None, stderr=None, preexec_fn=None):
    probe = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                           preexec_fn=preexec_fn, capture_output=True, text=True, check=True)
    seen.append(json.loads(probe.stdout))
    both.wait()
    return subprocess.CompletedProcess(cmd, 0 if "SEED=1" not in cmd[3] else 3)

  variants = [sweep.Variant(f"m,SEED={s}", (), (f"SEED = {s}",)) for s in range(2)]
  failed = sweep.run_sweep(variants, str(tmp_path), log=lambda _: None, runner=runner, workers=2)
  assert failed == ["m,SEED=1"]
  sets = sweep.core_sets(2)
  assert sorted(map(tuple, seen)) == sorted(sets) and not set(sets[0]) & set(sets[1])
  with pytest.raises(sweep.SweepError, match="concurrent runs on"):
    sweep.core_sets(len(os.sched_getaffinity(0)) + 1)


def test_a_grid_widens_past_the_edge_where_a_models_best_rate_lies(tmp_path):
  """b's best rate (1e-2) is the grid's highest: one rate beyond it (1e-2 * 1e-2 / 3e-3) runs,
  is worse, and 1e-2 is then inside; a, best at 3e-3, gets no extra rate."""
  spec = sweep.load_sweep_spec(lr_sweep_file(tmp_path, lr_grid={"values": [0.001, 0.003, 0.01], "seeds": [0],
                                                                "widen": 2}))
  assert spec.lr_grid.widen == 2
  workdir, fake, log = str(tmp_path / "w"), FakeTrainer(), []
  _, _, table = lr_search.run_step(spec.variants, spec.lr_grid, workdir, log=log.append, runner=fake)
  assert [c[0] for c in fake.calls[6:]] == ["b,lr=0.0333333,SEED=0"]
  assert table["b"]["chosen"] == 0.01 and not table["b"]["at_edge"] and table["b"]["grid"][-1] == 0.0333333
  assert table["a"]["grid"] == [0.001, 0.003, 0.01]
  assert lr_search.collected(spec.variants, spec.lr_grid, os.path.join(workdir, "lr_search")) == table
  text = lr_search.markdown(table)
  assert text.splitlines()[0].endswith("| lr=0.01 | lr=0.0333333 | chosen |")
  assert text.splitlines()[2].split(" | ")[-2] == "not run"
  assert lr_search.beyond([0.001, 0.003, 0.01], 0.001) == pytest.approx(0.000333333)
  assert lr_search.beyond([0.001, 0.003, 0.01], 0.003) is None
