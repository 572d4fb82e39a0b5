"""Experiment configs and sweeps: every gin file builds, the ladder keeps parameters equal,
a sweep runs its variants, skips finished ones and tabulates the results."""

import csv
import glob
import json
import os
import subprocess
import sys

import gin
import numpy as np
import pytest

from moe.model.counts import count_params
from moe.model.presets import model_config
from moe.research import sweep, sweep_results
from moe.train.run_files import read_eval_docs
from tests.data_fixtures import small_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "**", "*.gin"), recursive=True))


def build(path):
  from data.config import DataConfig
  from moe.train.config import TrainConfig

  gin.clear_config()
  gin.add_config_file_search_path(ROOT)
  try:
    gin.parse_config_file(path)
    return model_config(), DataConfig(), TrainConfig()
  finally:
    gin.clear_config()


SWEEPS = sorted(glob.glob(os.path.join(ROOT, "experiments", "sweeps", "*.json")))


@pytest.mark.parametrize("path", SWEEPS, ids=os.path.basename)
def test_shipped_sweep_file_loads_and_names_existing_configs(path):
  variants = sweep.load_sweep(path)  # raises on repeated variant names
  assert variants
  missing = [f for v in variants for f in v.gin_files if not os.path.exists(os.path.join(ROOT, f))]
  assert not missing, f"{os.path.basename(path)} names missing gin files {missing}"


def test_there_are_configs_for_every_model_of_the_comparisons():
  names = {os.path.relpath(p, os.path.join(ROOT, "experiments", "configs")) for p in CONFIGS}
  for scale in ("paper", "cpu"):
    for model in ("dense", "hash", "switch", "gshard", "gshard_x1.5", "dense_x16", "deepseekmoe",
                  "ladder_shared", "ladder_fine"):
      assert f"{scale}/{model}.gin" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_file_parses_and_builds(path):
  cfg, data, train = build(path)
  if "base" not in os.path.basename(path):
    assert cfg.name.startswith("cpu_" if "/cpu/" in path else "")
  count_params(cfg)  # builds the abstract model
  assert train.steps > 0 and data.seq_len > 0


@pytest.mark.parametrize("scale", ["paper", "cpu"])
def test_ablation_ladder_keeps_total_and_activated_params(scale):
  counts = [count_params(build(os.path.join(ROOT, "experiments", "configs", scale, f"{m}.gin"))[0])
            for m in ("gshard", "ladder_shared", "ladder_fine", "deepseekmoe")]
  for c in counts[1:]:  # the routers' [d, N'] matrices differ: 2% of the CPU models' total
    assert c.total == pytest.approx(counts[0].total, rel=0.02)
    assert c.activated == pytest.approx(counts[0].activated, rel=0.02)


def test_cpu_scale_keeps_the_paper_arithmetic():
  for m in ("hash", "switch", "gshard", "ladder_shared", "ladder_fine", "deepseekmoe"):
    cfg = build(os.path.join(ROOT, "experiments", "configs", "cpu", f"{m}.gin"))[0]
    paper = build(os.path.join(ROOT, "experiments", "configs", "paper", f"{m}.gin"))[0]
    assert (cfg.n_routed_experts, cfg.n_shared_experts, cfg.n_activated_experts, cfg.router) == \
           (paper.n_routed_experts, paper.n_shared_experts, paper.n_activated_experts, paper.router)
    f = cfg.dense_ffn_width
    assert (cfg.n_routed_experts + cfg.n_shared_experts) * cfg.expert_width == 16 * f


def test_cpu_scale_is_ffn_dominated_like_the_paper():
  """Vocabulary, FFN and attention shares of parameters and training FLOPs within a few
  points of the paper's 2B models (dense 0.2B: vocabulary 10% of parameters)."""
  from moe.model.counts import shares
  for cpu, paper in (("cpu_dense", "dense_0.2b"), ("cpu_deepseekmoe", "deepseekmoe_2b")):
    a, b = shares(model_config(cpu), 128), shares(model_config(paper), 2048)
    assert abs(a.vocab_params - b.vocab_params) < 0.05 and abs(a.ffn_params - b.ffn_params) < 0.05
    assert abs(a.ffn_flops - b.ffn_flops) < 0.05 and a.head_flops < 0.07
    assert sum((a.head_flops, a.ffn_flops, a.attention_flops)) == pytest.approx(1.0, abs=0.01)
    assert sum((a.vocab_params, a.ffn_params, a.attention_params)) == pytest.approx(1.0, abs=0.01)


# ---------------------------------------------------------------------------------------
# Sweep files.

def write(tmp_path, spec, name="s.json"):
  path = tmp_path / name
  path.write_text(json.dumps(spec) if not isinstance(spec, str) else spec)
  return str(path)


def test_sweep_variants_and_product(tmp_path):
  path = write(tmp_path, {"base": ["b.gin"], "bindings": ["X.y = 1"],
                          "variants": {"a": {"gin_files": ["a.gin"]}, "b": {"bindings": ["Z.w = 2"]}},
                          "product": {"model_config.expert_balance_alpha": [0.0, 0.01],
                                      "model_config.router": ["topk"]}})
  vs = sweep.load_sweep(path)
  assert [v.name for v in vs] == ["a,expert_balance_alpha=0.0,router=topk",
                                  "a,expert_balance_alpha=0.01,router=topk",
                                  "b,expert_balance_alpha=0.0,router=topk",
                                  "b,expert_balance_alpha=0.01,router=topk"]
  assert vs[0].gin_files == ("b.gin", "a.gin")
  assert vs[3].bindings == ("X.y = 1", "Z.w = 2", "model_config.expert_balance_alpha = 0.01",
                            "model_config.router = 'topk'")


@pytest.mark.parametrize("spec, error", [
    ("{not json", "cannot read sweep file"),
    ({"variantz": {}}, "expected a JSON object with keys"),
    ({"product": {"a.b": []}}, "needs a non-empty list"),
    ({"variants": {"a": {"gin_file": ["x"]}}}, "variant 'a' must be an object"),
    ({"bindings": "X.y = 1"}, "'bindings' must be a list of strings"),
])
def test_bad_sweep_file_is_a_clear_error(tmp_path, spec, error):
  with pytest.raises(sweep.SweepError, match=error):
    sweep.load_sweep(write(tmp_path, spec))


def test_sweep_runs_skips_finished_and_tabulates(tmp_path, small_corpus):
  source_dir, data_dir = small_corpus
  m = small_model()
  common = [f"model_config.{k} = {v!r}" for k, v in dict(
      preset="tiny_deepseekmoe", vocab_size=m.vocab_size, d_model=m.d_model, n_layers=m.n_layers,
      dense_ffn_width=m.dense_ffn_width, expert_width=m.expert_width, max_seq_len=m.max_seq_len,
      router="topk_bias").items()]
  common += [f"DataConfig.source_dir = {source_dir!r}", f"DataConfig.data_dir = {data_dir!r}",
             "DataConfig.vocab_size = 512", "DataConfig.seq_len = 64", "DataConfig.batch_size = 8",
             "DataConfig.eval_batches = 1", "TrainConfig.steps = 2", "TrainConfig.warmup_steps = 1",
             "TrainConfig.log_every = 1", "TrainConfig.eval_every = 2", "TrainConfig.checkpoint_every = 2"]
  path = write(tmp_path, {"bindings": common,
                          "product": {"model_config.n_activated_experts": [1, 3]},
                          "comparisons": [["n_activated_experts=3", "n_activated_experts=1"]]})
  workdir = tmp_path / "sweep"
  args = [sys.executable, "-m", "experiments.sweep", f"--sweep={path}", f"--workdir={workdir}"]
  first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
  out = workdir / "s.results"  # per sweep file (s.json): sweeps may share a workdir
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["variant"] for r in rows] == ["n_activated_experts=1", "n_activated_experts=3"]
  for r in rows:
    assert r["status"] == "finished" and r["step"] == "2"
    assert 0 < float(r["eval_loss"]) < 10 and float(r["max_over_mean_load"]) >= 1.0
  assert int(rows[1]["activated_params"]) > int(rows[0]["activated_params"])
  assert rows[0]["total_params"] == rows[1]["total_params"]
  assert "| variant |" in (out / "results.md").read_text()
  assert os.path.getsize(out / "results.png") > 1000
  assert os.path.getsize(out / "load.png") > 1000
  assert os.path.getsize(out / "bias_n_activated_experts=3.png") > 1000  # topk_bias runs
  assert float(rows[0]["gate_mass"]) > 0 and float(rows[0]["train_max_over_mean_load"]) >= 1.0
  # No zero-compute experts: every routed choice is a real expert.
  assert [float(r["real_experts_per_token"]) for r in rows] == [1.0, 3.0]
  # Every run keeps its final parameters and each held-out document's loss, which add up to
  # its validation loss; two different models see one list of documents (the bootstrap's pairs).
  docs = [read_eval_docs(str(workdir / r["variant"])) for r in rows]
  for d, r in zip(docs, rows):
    assert d["loss"].sum() / d["tokens"].sum() == pytest.approx(float(r["eval_loss"]), rel=1e-5)
    assert os.path.getsize(workdir / r["variant"] / "final_params.safetensors") > 10_000
    assert float(r["learning_rate"]) == 3e-3
  assert np.array_equal(docs[0]["fingerprint"], docs[1]["fingerprint"])
  assert np.array_equal(docs[0]["tokens"], docs[1]["tokens"]) and not np.allclose(docs[0]["loss"], docs[1]["loss"])
  table = (out / "comparisons.md").read_text()
  assert "| n_activated_experts=3 - n_activated_experts=1 | 1 |" in table and "| untested |" in table
  assert "comparisons:\n| A - B |" in first.stdout

  again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0
  assert again.stdout.count("finished earlier: skipped") == 2

  printed = subprocess.run(args + ["--print_commands"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
  lines = printed.stdout.strip().splitlines()
  assert len(lines) == 2 and all(l.startswith("python -m experiments.train --workdir=") for l in lines)
  assert "'--gin_bindings=model_config.n_activated_experts = 3'" in lines[1]
  # Sweep-wide overrides reach every variant, after the sweep file's bindings (so they win).
  over = subprocess.run(args + ["--print_commands", "--gin.TrainConfig.steps=7", "--mesh=data:-1"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  lines = over.stdout.strip().splitlines()
  assert over.returncode == 0 and len(lines) == 2, over.stderr[-2000:]
  for line in lines:
    assert line.endswith("'--gin_bindings=TrainConfig.steps = 7' --max_new_tokens=0 --mesh=data:-1"), line


def test_seed_summary_and_bias_curves(tmp_path):
  row = lambda name, loss, status="finished": {**{c: None for c in sweep_results.COLUMNS},
                                               "variant": name, "status": status, "eval_loss": loss,
                                               "gate_mass": 0.5}
  rows = [row("dense,SEED=0", 4.0), row("dense,SEED=1", 4.2), row("dense,SEED=2", 4.1),
          row("moe,SEED=0", 3.9), row("moe,SEED=1", 9.9, status="started"), row("other", 1.0)]
  summary = {r["model"]: r for r in sweep_results.seed_summary(rows)}
  assert set(summary) == {"dense", "moe"}
  assert summary["dense"]["seeds"] == 3 and summary["dense"]["mean"] == pytest.approx(4.1)
  assert summary["dense"]["spread"] == pytest.approx(0.2) and summary["dense"]["std"] == pytest.approx(0.1)
  assert summary["moe"]["seeds"] == 1 and summary["moe"]["std"] is None  # unfinished seed left out
  assert "| dense | 3 | 4.1 | 0.2 |" in sweep_results.summary_markdown(list(summary.values()))

  run = tmp_path / "run"
  run.mkdir()
  records = [{"step": 1, "loss": 3.0, "layers": {"score_bias": [[0.01, -0.01], [0.0, 0.0]]}},
             {"step": 2, "eval_loss": 3.0},
             {"step": 2, "loss": 2.0, "layers": {"score_bias": [[0.02, -0.02], [0.0, 0.0]]}}]
  (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
  assert sweep_results.bias_curves(str(run)) == {"expert 0": [(1, 0.01), (2, 0.02)],
                                                 "expert 1": [(1, -0.01), (2, -0.02)]}

  loads = [{"step": s, "loss": 2.0, "layers": {"max_over_mean_load": [m, m + 2.0]}}
           for s, m in ((10, 5.0), (20, 3.0), (30, 1.0), (40, 1.0))]
  # Killed after logging step 30, resumed from step 20's checkpoint: the resumed run's records count, once.
  killed = loads[:2] + [{"step": 30, "loss": 2.0, "layers": {"max_over_mean_load": [9.0, 9.0]}}]
  (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in killed + loads[2:] + [{"step": 40, "eval_loss": 2.5}]))
  assert sweep_results.load_curve(str(run)) == [(10, 6.0), (20, 4.0), (30, 2.0), (40, 2.0)]
  row = sweep_results.collect([sweep.Variant("run", (), ())], str(tmp_path))[0]
  assert row["train_max_over_mean_load"] == pytest.approx(3.5)
  assert row["late_train_max_over_mean_load"] == pytest.approx(2.0)  # steps after 20


BAD_INPUTS = {  # script and arguments -> a phrase of the one line it must print
    "preset_typo": (["experiments.train", "--gin.model_config.preset='tiny_deepseekmok'"],
                    "error: unknown preset 'tiny_deepseekmok'"),
    "invalid_config": (["experiments.train", "--gin.model_config.n_heads=5"],
                       "error: ModelConfig.n_heads=5: does not divide"),
    "unquoted_gin_string": (["experiments.train", "--gin.model_config.preset=tiny_deepseekmoe"],
                            "a string value needs quotes"),
    "missing_gin_file": (["experiments.train", "--gin_file=NOPE/missing.gin"],
                         "error: bad gin config: Unable to open file: NOPE/missing.gin"),
    "bad_mesh": (["experiments.train", "--mesh=data:3"], "error: bad mesh: mesh 'data:3' has 3 devices"),
    "eval_no_workdir": (["experiments.eval", "--workdir=NOPE"], "error: no checkpoint directory"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_naming_it(case, tmp_path):
  """No traceback: the last line of stderr names the problem (the lines before, if any, are
  logging of libraries); --traceback brings the traceback back."""
  argv, phrase = BAD_INPUTS[case]
  argv = [a.replace("NOPE", str(tmp_path / "nope")) for a in argv]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  if argv[0] == "experiments.train":
    argv.append(f"--workdir={tmp_path / 'run'}")
  out = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert phrase.replace("NOPE", str(tmp_path / "nope")) in lines[-1], lines[-1]
  assert sum(line.startswith("error:") for line in lines) == 1
  if case == "preset_typo":
    again = subprocess.run([sys.executable, "-m", *argv, "--traceback"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert "Traceback" in again.stderr and "unknown preset" in again.stderr
  assert not os.path.exists(tmp_path / "run" / "operative_config.gin")  # nothing written


@pytest.mark.parametrize("script, shared", [
    ("experiments.train", ["--gin_file", "--gin_bindings", "--mesh", "--traceback"]),
    ("experiments.sweep", ["--gin_file", "--gin_bindings", "--mesh", "--traceback"]),
    ("experiments.count_params", ["--traceback"])])
def test_shared_flags_show_in_help(script, shared):
  """--help lists the flags a script takes from the shared modules, not only its own."""
  out = subprocess.run([sys.executable, "-m", script, "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  text = out.stdout + out.stderr
  for flag in shared:
    assert f"  {flag}:" in text or f"  --[no]{flag[2:]}:" in text, (flag, text[-2000:])


def test_no_tpu_start_up_noise_without_an_accelerator(tmp_path):
  """libtpu is installed (jax[tpu], for compiling) but there is no TPU: scripts start on the
  CPU without libtpu's error lines. The PCI check decides."""
  from experiments import accelerators
  for vendor, accelerator in (("0x1af4", False), ("0x10de", True), ("0x1ae0", True)):
    os.makedirs(tmp_path / vendor / "0000:00:01.0")
    (tmp_path / vendor / "0000:00:01.0" / "vendor").write_text(vendor + "\n")
    assert accelerators.has_accelerator(str(tmp_path / vendor)) == accelerator
  assert accelerators.has_accelerator(str(tmp_path / "no_bus"))  # unknown: JAX decides
  if accelerators.has_accelerator():
    pytest.skip("this machine has an accelerator")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  out = subprocess.run([sys.executable, "-m", "experiments.count_params"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "total_params=" in out.stdout
  assert "TPU" not in out.stderr, out.stderr[-2000:]
