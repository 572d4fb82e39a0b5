"""lm-evaluation-harness's model `deepseekmoe_jax` (moe.train.harness) on the three local
tasks of tests/data/harness (multiple choice, rolling perplexity, generation until a stop
sequence) and a tiny released-format checkpoint: every log-likelihood equals transformers'
(f32) and the project's own scoring, the metrics follow from those, greedy generations are
experiments.generate's (one device) cut at the stop, a task compiles one program per length
bucket, and the command line gives the same numbers; scored and generated on a mesh of the
8 simulated devices."""

import contextlib
import glob
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.capabilities import import_or_skip

harness_pkg = import_or_skip("lm_eval", "lm_eval")
torch = import_or_skip("torch", "torch")
import_or_skip("transformers", "torch")

import tokenizers  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from experiments import generation  # noqa: E402
from moe.train import lm_eval  # noqa: E402
from moe.train.harness import DeepSeekMoELM, pair_row, rolling_rows  # noqa: E402
from tests import hub_fixtures as fx  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_DIR = os.path.join("tests", "data", "harness")  # the YAMLs' data_files are relative to ROOT
TASKS = ["moe_harness_mc", "moe_harness_ppl", "moe_harness_gen"]
MAX_LEN = fx.HF["max_position_embeddings"]  # 64: buckets 16, 32, 64
MESH = "fsdp:2,expert:2,tensor:2"  # the 8 simulated devices: batches split 4 ways, heads 2


def docs(name):
  with open(os.path.join(ROOT, TASK_DIR, name)) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """(directory, transformers' model, LM head, tokenizers' tokenizer): its BPE is trained on
  the tasks' own texts."""
  d = str(tmp_path_factory.mktemp("harness") / "tiny-hf")
  texts = [" ".join(map(str, doc.values())) for f in ("mc.jsonl", "ppl.jsonl", "gen.jsonl") for doc in docs(f)]
  ref, tensors = fx.make_checkpoint(d, texts)
  return d, ref, tensors["lm_head.weight"], tokenizers.Tokenizer.from_file(os.path.join(d, "tokenizer.json"))


@pytest.fixture(scope="module")
def generated(ckpt):
  """experiments.generate's greedy 12 new tokens for each prompt of the generation task."""
  loaded = generation.load_hf_checkpoint(ckpt[0], "float32")
  return generation.generate_text(loaded, [d["prompt"] for d in docs("gen.jsonl")], 12, warmup=False)


@pytest.fixture(scope="module")
def raw_generations(generated):
  return generated["texts"]


def stop_of(texts):
  """A stop sequence that cuts at least one of `texts` after its first character."""
  return next(c for t in texts for c in t[1:] if c.isalnum())


@pytest.fixture(scope="module")
def evaluated(ckpt, raw_generations):
  """(adapter, lm-eval's results with samples, the stop sequence): the three tasks in
  process, scored and generated on the mesh."""
  lm_eval._scorer.cache_clear()  # a fresh jit: its cache holds what this run compiles
  model = DeepSeekMoELM(hf_checkpoint=ckpt[0], dtype="float32", batch_size=1, mesh=MESH.replace(",", ";"))
  stop = stop_of(raw_generations)
  with contextlib.chdir(ROOT):
    results = harness_pkg.simple_evaluate(model=model, tasks=TASKS, log_samples=True,
                                          task_manager=TaskManager(include_path=TASK_DIR),
                                          gen_kwargs={"until": [stop]})
  return model, results, stop


def reference_score(ckpt, ids, n_scored):
  """(sum of log p of the last n_scored tokens of ids, each of them the argmax) by transformers."""
  _, ref, head, _ = ckpt
  with torch.no_grad():
    h = ref(torch.tensor([ids[:-1]])).last_hidden_state[0].numpy().astype(np.float64)
  logits = h @ head.T.astype(np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  targets, rows = np.asarray(ids[1:]), np.arange(len(ids) - 1)[-n_scored:]
  return float(logp[rows, targets[rows]].sum()), bool(np.all(logp[rows].argmax(-1) == targets[rows]))


def reference_pair(ckpt, context, continuation):
  """lm-eval's HF model's pairing, written out: BOS + ids; trailing spaces of the context go
  to the continuation; the continuation is what context + continuation adds."""
  tok, bos = ckpt[3], ckpt[3].token_to_id(fx.BOS)
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  ctx = [bos] + tok.encode(context, add_special_tokens=False).ids
  whole = [bos] + tok.encode(context + continuation, add_special_tokens=False).ids
  return reference_score(ckpt, (ctx + whole[len(ctx):])[-(MAX_LEN + 1):], len(whole) - len(ctx))


def reference_rolling(ckpt, text):
  """log p(text | BOS): each token predicted once, from the up to MAX_LEN tokens before it
  that its window of MAX_LEN predictions holds."""
  tok = ckpt[3]
  full = [tok.token_to_id(fx.BOS)] + tok.encode(text, add_special_tokens=False).ids
  total, start = 0.0, 0
  while start < len(full) - 1:
    end = min(start + MAX_LEN, len(full) - 1)  # predicts full[start + 1 .. end]
    total += reference_score(ckpt, full[max(0, end - MAX_LEN):end + 1], end - start)[0]
    start = end
  return total


def test_multiple_choice_loglikelihoods_and_accuracy(ckpt, evaluated):
  model, results, _ = evaluated
  samples = sorted(results["samples"]["moe_harness_mc"], key=lambda s: s["doc_id"])
  items, want, got = docs("mc.jsonl"), [], []
  assert len(samples) == len(items) == 6
  for s, item in zip(samples, items):
    assert [tuple(a) for a in s["arguments"]] == [(item["question"], " " + c) for c in item["choices"]]
    want.append([reference_pair(ckpt, *a) for a in s["arguments"]])
    got.append([tuple(r[0]) for r in s["resps"]])
  for w, g in zip(want, got):  # transformers' log-likelihoods and greedy flags, f32
    np.testing.assert_allclose([x[0] for x in g], [x[0] for x in w], rtol=1e-4, atol=1e-4)
    assert [x[1] for x in g] == [x[1] for x in w]
  # The project's own scoring (moe.train.lm_eval) of the same (context, continuation) pairs.
  lm, tok = lm_eval.LM(model.loaded.graphdef, model.loaded.params, model.loaded.mesh), model.tok
  own = lm_eval.multiple_choice(lm, tok, [{"context": i["question"], "choices": [" " + c for c in i["choices"]],
                                           "answer": i["answer"]} for i in items], seq_len=MAX_LEN)
  for o, g in zip(own["loglik"], got):
    np.testing.assert_allclose(o, [x[0] for x in g], rtol=1e-5, atol=1e-5)
  # Accuracy on the hand-made answers, from transformers' numbers: the argmax, and the
  # argmax per character of the choice (lm-eval's acc_norm).
  lls = [np.asarray([x[0] for x in w]) for w in want]
  acc = np.mean([np.argmax(ll) == i["answer"] for ll, i in zip(lls, items)])
  acc_norm = np.mean([np.argmax(ll / [len(c) for c in i["choices"]]) == i["answer"] for ll, i in zip(lls, items)])
  metrics = results["results"]["moe_harness_mc"]
  assert metrics["acc,none"] == pytest.approx(acc) and metrics["acc_norm,none"] == pytest.approx(acc_norm)
  assert own["accuracy"] == pytest.approx(acc)
  assert 0 < acc < 1 and acc != acc_norm  # both metrics see the model, not a constant


def test_rolling_perplexity(ckpt, evaluated):
  model, results, _ = evaluated
  samples = sorted(results["samples"]["moe_harness_ppl"], key=lambda s: s["doc_id"])
  texts = [d["text"] for d in docs("ppl.jsonl")]
  got = [s["resps"][0][0] for s in samples]
  want = [reference_rolling(ckpt, t) for t in texts]
  np.testing.assert_allclose(got, want, rtol=1e-4)
  n_tokens = [len(ckpt[3].encode(t, add_special_tokens=False).ids) for t in texts]
  assert max(n_tokens) > 2 * MAX_LEN and min(n_tokens) < MAX_LEN  # three windows and one
  # One window: the project's perplexity (BOS, then every token predicted) is the same sum.
  lm = lm_eval.LM(model.loaded.graphdef, model.loaded.params, model.loaded.mesh)
  for text, n, g in zip(texts, n_tokens, got):
    if n <= MAX_LEN:
      ppl = lm_eval.perplexity(lm, model.tok, text, seq_len=MAX_LEN)
      assert ppl["tokens"] == n and -ppl["nll"] * n == pytest.approx(g, rel=1e-5)
  words = sum(len(re.split(r"\s+", t)) for t in texts)
  n_bytes = sum(len(t.encode()) for t in texts)
  metrics = results["results"]["moe_harness_ppl"]
  assert metrics["word_perplexity,none"] == pytest.approx(math.exp(-sum(want) / words), rel=1e-4)
  assert metrics["byte_perplexity,none"] == pytest.approx(math.exp(-sum(want) / n_bytes), rel=1e-4)
  assert metrics["bits_per_byte,none"] == pytest.approx(-sum(want) / n_bytes / math.log(2), rel=1e-4)


def test_generation_is_experiments_generate_cut_at_the_stop(evaluated, raw_generations):
  _, results, stop = evaluated
  samples = sorted(results["samples"]["moe_harness_gen"], key=lambda s: s["doc_id"])
  prompts = [d["prompt"] for d in docs("gen.jsonl")]
  assert [s["arguments"][0][0] for s in samples] == prompts
  assert all(s["arguments"][0][1]["until"] == [stop] and s["arguments"][0][1]["max_gen_toks"] == 12
             for s in samples)
  got = [s["filtered_resps"][0] for s in samples]
  assert got == [t.split(stop)[0] for t in raw_generations]
  assert any(len(g) < len(t) for g, t in zip(got, raw_generations))  # the stop did cut
  answers = [d["answer"] for d in docs("gen.jsonl")]
  assert results["results"]["moe_harness_gen"]["exact_match,none"] == np.mean(
      [g == a for g, a in zip(got, answers)])


def test_a_few_compiled_shapes_and_none_per_request(ckpt, evaluated):
  model, results, _ = evaluated
  shapes = model.get_model_info()["compiled_shapes"]
  assert results["config"]["compiled_shapes"] == shapes
  # Rows of up to 64 tokens in buckets of 16, 32 and 64, a batch of ~64 tokens each, rounded
  # up to split over the mesh's 4 batch shards.
  assert set(shapes["loglikelihood"]) | set(shapes["loglikelihood_rolling"]) <= {(4, 16), (4, 32), (4, 64)}
  assert set(shapes["generate_until"]) <= {(4, 16), (4, 32), (4, 64)}
  jitted = lm_eval._scorer(model.loaded.graphdef, model.loaded.mesh)
  compiled = jitted._cache_size()
  assert compiled == len(model.scorer.shapes) <= 3  # one program per bucket used, no more
  assert all(set(dec.traces.values()) == {1} for dec in model.generator.decoders.values())
  # More requests of new lengths within the same buckets: nothing new is compiled.
  from lm_eval.api.instance import Instance
  requests = [Instance("loglikelihood", {}, ("x" * k, " y"), 0) for k in range(1, 40, 3)]
  out = model.loglikelihood(requests)
  assert len(out) == len(requests) and jitted._cache_size() == compiled


def test_greedy_flags_mark_the_models_own_continuations(evaluated, generated):
  """lm-eval's is_greedy: true for a greedy generation's tokens after their prompt, false
  once one of them is changed."""
  model = evaluated[0]
  rows = []
  for prompt, new in zip(generated["prompt_ids"], generated["generated_ids"]):
    new = [t for t in new if t != model.tok.eos_id][:6]
    if not new:
      continue
    for last in (new[-1], (new[-1] + 1) % fx.HF["vocab_size"]):
      rows.append((np.asarray(prompt + new[:-1] + [last], np.int32),
                   np.r_[np.zeros(len(prompt) - 1), np.ones(len(new))].astype(np.float32)))
  _, greedy = model.scorer.score(rows)
  assert len(rows) >= 4 and greedy.tolist() == [True, False] * (len(rows) // 2)


class _ByteTokenizer:
  """Byte ids + 2, no BOS (a run's tokenizer trained without one): EOS is the prefix."""
  path, eos_id, add_bos, bos_id = "bytes", 1, False, 0

  def encode(self, text):
    return np.asarray(list(text.encode()), np.int32) + 2


def test_rows_predict_every_token_once_without_bos():
  tok = _ByteTokenizer()
  text = "abcdefghij" * 15  # 150 tokens: windows of 64, 64 and 22 predictions
  rows = rolling_rows(tok, text, 64)
  assert [int(w.sum()) for _, w in rows] == [64, 64, 22]
  assert rows[0][0][0] == tok.eos_id and all(len(ids) == 65 for ids, _ in rows)  # full context
  assert np.concatenate([ids[1:][w > 0] for ids, w in rows]).tolist() == tok.encode(text).tolist()
  ids, w = pair_row(tok, "", "xyz", 64)  # an empty context: the prefix token
  assert ids.tolist() == [1] + tok.encode("xyz").tolist() and w.tolist() == [1, 1, 1]
  ids, w = pair_row(tok, "ab ", "c", 64)  # the context's trailing space joins the continuation
  assert ids.tolist() == tok.encode("ab c").tolist() and w.tolist() == [0, 1, 1]


def test_the_command_line_gives_the_same_numbers(ckpt, evaluated, raw_generations, tmp_path):
  _, results, _ = evaluated
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.lm_eval", "--model", "deepseekmoe_jax", "--model_args",
       f"hf_checkpoint={ckpt[0]},dtype=float32,mesh='{MESH}'",
       "--include_path", TASK_DIR, "--tasks", ",".join(TASKS), "--output_path", str(out), "--log_samples"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_DATASETS_OFFLINE="1"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(r"loglikelihood: 20 requests in \d \(batch, length\) shapes", proc.stderr), proc.stderr[-3000:]
  assert "|moe_harness_mc |" in proc.stdout and "word_perplexity" in proc.stdout
  with open(glob.glob(str(out / "**" / "results_*.json"), recursive=True)[0]) as f:
    cli = json.load(f)["results"]
  for task, metric in (("moe_harness_mc", "acc,none"), ("moe_harness_mc", "acc_norm,none"),
                       ("moe_harness_ppl", "word_perplexity,none"), ("moe_harness_ppl", "bits_per_byte,none")):
    assert cli[task][metric] == pytest.approx(results["results"][task][metric], rel=1e-4), (task, metric)
  # Generation on the mesh equals experiments.generate's on one device, cut at the task's own
  # stop ("\n") this time.
  with open(glob.glob(str(out / "**" / "samples_moe_harness_gen_*.jsonl"), recursive=True)[0]) as f:
    samples = sorted(map(json.loads, f), key=lambda s: s["doc_id"])
  assert [s["filtered_resps"][0] for s in samples] == [t.split("\n")[0] for t in raw_generations]
