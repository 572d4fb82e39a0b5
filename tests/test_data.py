import json
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from data import documents, input_pipeline, packing
from data.config import DataConfig
from data.input_pipeline import ArrayBatches, Rows, StreamBatches, make_datasets
from data.stdlib_corpus import split_of
from data.tokenizer import Tokenizer, check_token_ids, train_tokenizer
from tests.data_fixtures import N_TRAIN, N_VALID, small_data_config


def test_builder_prepares_offline_with_metadata(small_corpus):
  import platform
  b = documents.builder(small_data_config(small_corpus))
  assert b.info.splits["train"].num_examples == N_TRAIN
  assert b.info.splits["validation"].num_examples == N_VALID
  assert b.info.metadata["python_version"] == platform.python_version()
  with open(os.path.join(b.data_dir, "metadata.json")) as f:
    assert json.load(f)["python_version"] == platform.python_version()
  paths = [p for p, _ in zip(documents.documents(small_data_config(small_corpus), "validation"), range(99))]
  assert len(paths) == N_VALID


def test_split_is_a_fixed_hash_of_the_path():
  assert split_of("json/decoder.py") == split_of("json/decoder.py")
  splits = [split_of(f"pkg/mod{i}.py") for i in range(2000)]
  assert 0.02 < splits.count("validation") / 2000 < 0.09


def test_empty_corpus_is_a_clear_error(tmp_path):
  (tmp_path / "src").mkdir()
  cfg = DataConfig(source_dir=str(tmp_path / "src"), data_dir=str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match=r"0 \.py file\(s\).*empty"):
    documents.builder(cfg)


def test_source_dir_is_only_for_the_embedded_corpus(tmp_path):
  with pytest.raises(ValueError, match="source_dir applies to the embedded corpus only"):
    documents.builder(DataConfig(dataset="lm1b", source_dir=str(tmp_path), data_dir=str(tmp_path)))


@pytest.fixture(scope="module")
def tokenizer(small_corpus):
  return input_pipeline.tokenizer_for(small_data_config(small_corpus))


def test_tokenizer_round_trips_code_and_falls_back_to_bytes(tokenizer):
  assert tokenizer.vocab_size == 512
  code = "def f(x):\n\tif x:\n        return 'é漢字 ✓'  # comment\n\n"
  ids = tokenizer.encode(code)
  assert tokenizer.decode(ids) == code
  assert ids.max() < 512 and ids.min() >= 0


def test_tokenizer_is_cached_and_loadable_by_path(small_corpus, tokenizer):
  again = input_pipeline.tokenizer_for(small_data_config(small_corpus))
  assert again.path == tokenizer.path
  by_path = input_pipeline.tokenizer_for(small_data_config(small_corpus, tokenizer_path=tokenizer.path))
  np.testing.assert_array_equal(by_path.encode("import os"), tokenizer.encode("import os"))
  with pytest.raises(FileNotFoundError, match="nope.model"):
    Tokenizer("/nonexistent/nope.model")


def test_train_tokenizer_small(tmp_path):
  tok = train_tokenizer(["alpha beta gamma\n" * 50, "delta epsilon\n" * 50], str(tmp_path / "t.model"), 300)
  assert tok.vocab_size == 300 and tok.decode(tok.encode("alpha delta")) == "alpha delta"


def test_out_of_vocab_ids_are_an_error():
  check_token_ids(np.array([0, 5, 9]), 10)
  with pytest.raises(ValueError, match=r"outside the model's vocab \[0, 10\), first 10 at flat index 2"):
    check_token_ids(np.array([0, 5, 10, 11]), 10)
  with pytest.raises(ValueError, match="first -1"):
    check_token_ids(np.array([[-1]]), 10)


def test_tokenizer_larger_than_model_vocab_is_an_error(small_corpus, tokenizer):
  with pytest.raises(ValueError, match="512 pieces but ModelConfig.vocab_size=256"):
    make_datasets(small_data_config(small_corpus), model_vocab_size=256)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=0, max_size=12), seq_len=st.integers(1, 17))
def test_packing_loses_and_duplicates_nothing(lengths, seq_len):
  rng = np.random.default_rng(sum(lengths) + seq_len)
  docs = [rng.integers(3, 100, n) for n in lengths]
  rows = list(packing.pack(docs, seq_len, eos_id=2))
  stream = np.concatenate([np.append(d, 2) for d in docs]) if docs else np.zeros(0, int)
  tokens = np.concatenate([r.tokens for r in rows]) if rows else np.zeros(0, int)
  segs = np.concatenate([r.segment_ids for r in rows]) if rows else np.zeros(0, int)
  np.testing.assert_array_equal(tokens[segs > 0], stream)   # same tokens, same order
  assert np.all(tokens[segs == 0] == 0)                     # padding only at the very end
  assert all(len(r.tokens) == seq_len for r in rows)
  assert np.all(segs[: len(stream)] > 0) and np.all(segs[len(stream):] == 0)
  for r in rows:  # positions restart at each segment; segment ids count up from 1
    for s in np.unique(r.segment_ids[r.segment_ids > 0]):
      np.testing.assert_array_equal(r.positions[r.segment_ids == s], np.arange(np.sum(r.segment_ids == s)))
    nz = r.segment_ids[r.segment_ids > 0]
    np.testing.assert_array_equal(np.unique(nz), np.arange(1, len(np.unique(nz)) + 1))


def test_lm_example_targets_stay_in_segment():
  tokens = np.array([[5, 6, 2, 7, 8, 2, 0, 0]])
  segs = np.array([[1, 1, 1, 2, 2, 2, 0, 0]])
  targets, weights = packing.lm_example(tokens, segs)
  np.testing.assert_array_equal(targets, [[6, 2, 7, 8, 2, 0, 0, 0]])
  np.testing.assert_array_equal(weights, [[1, 1, 0, 1, 1, 0, 0, 0]])


def _rows(n=10, s=4):
  t = np.arange(n * s, dtype=np.int32).reshape(n, s)
  return Rows(t, np.ones_like(t), np.tile(np.arange(s, dtype=np.int32), (n, 1)))


def test_array_batches_are_deterministic_and_resume_exactly():
  a = ArrayBatches(_rows(), batch_size=4, seed=3)
  straight = [next(a)["inputs"] for _ in range(7)]
  b = ArrayBatches(_rows(), batch_size=4, seed=3)
  [next(b) for _ in range(3)]
  c = ArrayBatches(_rows(), batch_size=4, seed=3)
  c.set_state(b.get_state())
  for i in range(3, 7):
    np.testing.assert_array_equal(next(c)["inputs"], straight[i])
  # Each epoch visits every row once.
  epoch = np.concatenate([ArrayBatches(_rows(), 5, seed=1).batch(i)["inputs"] for i in range(2)])
  assert sorted(epoch[:, 0].tolist()) == list(range(0, 40, 4))


def test_hosts_take_disjoint_slices_of_the_global_batch():
  full = ArrayBatches(_rows(), 4, seed=0).batch(2)["inputs"]
  parts = [ArrayBatches(_rows(), 4, seed=0, shard_index=i, shard_count=2).batch(2)["inputs"] for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(parts), full)
  with pytest.raises(ValueError, match="does not split over 3 hosts"):
    ArrayBatches(_rows(), 4, seed=0, shard_count=3)


def test_stream_batches_resume_exactly():
  make = lambda: iter([packing.Packed(*r) for r in zip(*_rows(5))])
  straight = StreamBatches(make, 2)
  expected = [next(straight)["inputs"] for _ in range(6)]  # wraps around the 5 rows
  resumed = StreamBatches(make, 2)
  resumed.set_state({"step": 4})
  np.testing.assert_array_equal(next(resumed)["inputs"], expected[4])


def test_real_tfds_dataset_path_with_mock_data(tmp_path):
  import tensorflow_datasets as tfds
  cfg = DataConfig(dataset="lm1b", data_dir=str(tmp_path), vocab_size=300, seq_len=32,
                   batch_size=4, eval_batches=2, tokenizer_lines=2000)
  with tfds.testing.mock_data(num_examples=64):
    data = make_datasets(cfg, model_vocab_size=300)
    batch = next(data.train)
  assert isinstance(data.train, StreamBatches)
  assert batch["inputs"].shape == (4, 32) and batch["inputs"].max() < 300
  assert float(batch["weights"].sum()) > 0 and len(data.eval_batches) == 2


def test_unknown_text_feature_is_named(tmp_path):
  import tensorflow_datasets as tfds
  cfg = DataConfig(dataset="lm1b", data_dir=str(tmp_path), text_key="body")
  with tfds.testing.mock_data(num_examples=4):
    with pytest.raises(KeyError, match="no feature 'body'"):
      next(documents.documents(cfg, "train"))


def test_embedded_corpus_end_to_end(small_corpus):
  data = make_datasets(small_data_config(small_corpus), model_vocab_size=512)
  batch = next(data.train)
  assert set(batch) == {"inputs", "targets", "weights", "segment_ids", "positions"}
  assert batch["inputs"].shape == (8, 64)
  assert 3.0 < data.unigram_entropy < np.log(512)
  assert len(data.eval_batches) == 2


def test_missing_split_names_the_splits_there_are(tmp_path, small_corpus):
  with pytest.raises(ValueError, match=r"no split 'test'; its splits are \['train', 'validation'\]"):
    next(documents.documents(small_data_config(small_corpus), "test"))
  documents.check_split("lm1b", "train[:90%]+test", ["test", "train"])  # split expressions
  with pytest.raises(ValueError, match=r"'lm1b' has no split 'validation'.*\['test', 'train'\]"):
    documents.check_split("lm1b", "validation", ["test", "train"])
