"""The released format in workflows: fine-tuning from a checkpoint directory (starts at its
loss, resumes bit-exactly), exporting a training run (tokenizer included), and evaluating
a checkpoint on local files (perplexity, multiple choice) against transformers' model."""

import glob
import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.capabilities import import_or_skip

torch = import_or_skip("torch", "torch")
transformers = import_or_skip("transformers", "torch")

from data.input_pipeline import make_datasets, tokenizer_for  # noqa: E402
from data.text_tokenizer import HFTokenizer, SPM_MODEL, load_tokenizer  # noqa: E402
from data.tokenizer import Tokenizer  # noqa: E402
from moe.hub.hf_config import config_from_hf  # noqa: E402
from moe.hub.safetensors_import import import_checkpoint  # noqa: E402
from moe.parallel.mesh import MeshConfig, make_mesh  # noqa: E402
from moe.train import lm_eval  # noqa: E402
from moe.train.config import TrainConfig  # noqa: E402
from moe.train.export import export_run  # noqa: E402
from moe.train.loop import train_and_evaluate  # noqa: E402
from moe.train.restore import restore_run  # noqa: E402
from moe.train.steps import make_steps  # noqa: E402
from tests import hub_fixtures as fx  # noqa: E402
from tests.data_fixtures import small_data_config, small_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, small_corpus):
  """A released-format checkpoint whose tokenizer.json was trained on the small corpus."""
  d = str(tmp_path_factory.mktemp("hf") / "tiny-hf")
  files = sorted(glob.glob(os.path.join(small_corpus[0], "**", "*.py"), recursive=True))
  ref, tensors = fx.make_checkpoint(d, [open(f).read() for f in files])
  return d, ref, tensors


def finetune(workdir, hf, corpus, stop=None, steps=4):
  train = TrainConfig(steps=steps, warmup_steps=1, learning_rate=1e-3, log_every=1, eval_every=steps,
                      checkpoint_every=steps, async_checkpoints=False, init_from_hf=hf)
  # The model config passed in is the tiny preset: only how it computes is taken from it.
  return train_and_evaluate(str(workdir), small_model(remat=True), small_data_config(corpus, eval_batches=1),
                            train, stop_after_steps=stop)


def logged(workdir, key="lm_loss"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r[key] for r in map(json.loads, f)}


def test_finetune_starts_at_the_checkpoints_loss_and_resumes_bit_exactly(hf_dir, small_corpus, tmp_path):
  d, _, _ = hf_dir
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  out = finetune(straight, d, small_corpus)
  assert out.status == "finished" and np.isfinite(out.train_loss)
  with open(straight / "run_config.json") as f:
    recorded = json.load(f)
  assert recorded["model"] == json.loads(json.dumps(
      config_from_hf(fx.HF, name="tiny-hf", remat=True).__dict__))  # the checkpoint's architecture
  assert recorded["data"]["tokenizer_path"] == d and recorded["train"]["init_from_hf"] == d

  # Step 1's loss is the imported parameters' loss on the first batch.
  imported = import_checkpoint(d, dtype="float32")
  data_cfg = small_data_config(small_corpus, eval_batches=1, tokenizer_path=d)
  data = make_datasets(data_cfg, fx.HF["vocab_size"])
  assert isinstance(data.tokenizer, HFTokenizer) and data.tokenizer.eos_id == 1
  first = next(data.train)
  data.train.close()
  nll, n = make_steps(imported.graphdef, imported.params).eval(imported.params, first)[:2]
  losses = logged(straight)
  assert losses[1] == pytest.approx(float(nll) / float(n), rel=1e-5)
  assert abs(losses[1] - np.log(fx.HF["vocab_size"])) > 1.0  # not a freshly initialised model

  # Stopped after 2 steps and resumed: its own checkpoint wins over the import.
  assert finetune(resumed, d, small_corpus, stop=2).status == "stopped"
  assert finetune(resumed, d, small_corpus).status == "finished"
  assert logged(resumed) == losses
  a, b = restore_run(str(straight)), restore_run(str(resumed))
  assert a.step == b.step == 4
  for (path, x), (_, y) in zip(nnx.to_flat_state(a.params), nnx.to_flat_state(b.params)):
    assert np.array_equal(np.asarray(x.get_value()), np.asarray(y.get_value())), path


def test_export_of_a_training_run(small_corpus, tmp_path):
  workdir, out = tmp_path / "run", str(tmp_path / "export")
  train_and_evaluate(str(workdir), small_model(), small_data_config(small_corpus, eval_batches=1),
                     TrainConfig(steps=2, warmup_steps=1, log_every=2, eval_every=2, checkpoint_every=2,
                                 async_checkpoints=False))
  result = export_run(str(workdir), out, dtype="float32", max_shard_bytes=200_000)
  assert result.step == 2 and not result.notes, result.notes
  assert {"config.json", "model.safetensors.index.json", SPM_MODEL, "tokenizer.json",
          "tokenizer_config.json"} <= set(result.files)
  run, imported = restore_run(str(workdir)), import_checkpoint(out, dtype="float32")
  for (path, x), (_, y) in zip(nnx.to_flat_state(run.params), nnx.to_flat_state(imported.params)):
    assert np.array_equal(np.asarray(x.get_value()), np.asarray(y.get_value())), path
  # The converted tokenizer.json gives the run's SentencePiece ids; both load by directory.
  spm, converted = tokenizer_for(run.data_cfg), load_tokenizer(out)
  assert isinstance(spm, Tokenizer) and isinstance(converted, HFTokenizer)
  text = open(glob.glob(os.path.join(small_corpus[0], "**", "*.py"), recursive=True)[0]).read()
  assert converted.encode(text).tolist() == spm.encode(text).tolist()
  assert (converted.bos_id, converted.eos_id) == (spm.bos_id, spm.eos_id) == (1, 2)
  assert not spm.add_bos and not converted.add_bos  # trained without BOS; exported so
  with open(os.path.join(out, "config.json")) as f:
    assert (json.load(f)["bos_token_id"], spm.vocab_size) == (1, 512)
  auto = transformers.AutoTokenizer.from_pretrained(out)
  assert auto(text, add_special_tokens=False)["input_ids"] == spm.encode(text).tolist()


def reference_logprobs(ref, lm_head, ids, weights):
  """Sum of weighted log p(ids[i+1] | ids[:i+1]) by transformers' model."""
  with torch.no_grad():
    h = ref(torch.tensor(np.asarray(ids[:-1])[None])).last_hidden_state[0].numpy().astype(np.float64)
  logits = h @ lm_head.T.astype(np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  return float(np.sum(logp[np.arange(len(ids) - 1), ids[1:]] * weights))


def test_perplexity_and_multiple_choice_against_transformers(hf_dir, tmp_path):
  d, ref, tensors = hf_dir
  tok, head = load_tokenizer(d), tensors["lm_head.weight"]
  text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 0\n" * 3
  one = lm_eval.LM(*import_checkpoint(d, dtype="float32")[1:3])
  mesh = make_mesh(MeshConfig("fsdp:2,expert:2,tensor:2"))
  on_mesh = lm_eval.LM(*import_checkpoint(d, mesh, dtype="float32")[1:3], mesh)
  ids = np.concatenate([[tok.bos_id], tok.encode(text)])
  want = sum(reference_logprobs(ref, head, w, np.ones(len(w) - 1)) for w, _ in lm_eval.text_rows(ids, 32))
  for lm in (one, on_mesh):
    got = lm_eval.perplexity(lm, tok, text, seq_len=32)
    assert got["tokens"] == len(ids) - 1 and got["windows"] == -(-(len(ids) - 1) // 32)
    assert got["nll"] == pytest.approx(-want / (len(ids) - 1), rel=1e-4)
    assert got["layers"]["load"].shape == (3, 8)

  contexts = ["import os\n", "for i in range(", "x = [1, 2", "def f(self):\n"]
  choices = [["def", "return", "class "], ["10):", "x)", "'a'"], [", 3]", "}", "):\n"], ["    pass", "import", "("]]
  ref_scores = [[reference_logprobs(ref, head, *lm_eval.choice_row(tok, c, x, 32)) for x in xs]
                for c, xs in zip(contexts, choices)]
  # Answers: the reference's best choice for the first three items, its worst for the last.
  answers = [int(np.argmax(s)) for s in ref_scores[:3]] + [int(np.argmin(ref_scores[3]))]
  items = [{"context": c, "choices": xs, "answer": a} for c, xs, a in zip(contexts, choices, answers)]
  norm = [np.asarray(s) / [len(x) for x in xs] for s, xs in zip(ref_scores, choices)]
  want_norm = np.mean([np.argmax(s) == a for s, a in zip(norm, answers)])
  for lm in (one, on_mesh):
    got = lm_eval.multiple_choice(lm, tok, items, seq_len=32)
    np.testing.assert_allclose(got["loglik"], ref_scores, rtol=1e-4, atol=1e-4)
    assert got["accuracy"] == 0.75 and got["accuracy_norm"] == pytest.approx(want_norm)

  # The script, on the same files.
  (tmp_path / "t.txt").write_text(text)
  with open(tmp_path / "c.jsonl", "w") as f:
    f.writelines(json.dumps(item) + "\n" for item in items)
  proc = subprocess.run([sys.executable, "-m", "experiments.eval", f"--hf_checkpoint={d}", "--dtype=float32",
                         f"--text_file={tmp_path / 't.txt'}", f"--choices_file={tmp_path / 'c.jsonl'}",
                         "--seq_len=32", "--mesh=fsdp:2,expert:2,tensor:2"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  nll = float(re.search(r"perplexity \S+: (\S+) nats/token", proc.stdout).group(1))
  assert nll == pytest.approx(-want / (len(ids) - 1), abs=1e-4)
  assert "accuracy 0.7500" in proc.stdout and "router entropy" in proc.stdout
