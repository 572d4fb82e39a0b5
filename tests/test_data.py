import json
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from data import documents, input_pipeline, packing
from data.config import DataConfig
from data.input_pipeline import make_datasets
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


def test_runs_started_together_on_a_fresh_cache_all_get_the_dataset(small_corpus, tmp_path):
  # A sweep's parallel runs each prepare the dataset (and then the tokenizer) on a new
  # machine; unserialised, all but one fail to rename the dataset into place.
  import threading
  cfg = small_data_config((small_corpus[0], str(tmp_path / "tfds")))
  start, errors, infos = threading.Barrier(3), [], []

  def prepare():
    start.wait()
    try:
      examples = documents.builder(cfg).info.splits["train"].num_examples
      infos.append((examples, input_pipeline.tokenizer_for(cfg).vocab_size))
    except Exception as e:  # noqa: BLE001 -- the failure is what is asserted on
      errors.append(e)

  threads = [threading.Thread(target=prepare) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  assert infos == [(N_TRAIN, 512)] * 3


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


def _pack(docs, seq_len):
  """docs: [n] token arrays (EOS included) -> packed rows, through grain."""
  import grain
  ds = grain.MapDataset.source([{"tokens": np.asarray(d, np.int32)} for d in docs]).to_iter_dataset()
  return list(packing.pack(ds, seq_len))


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=0, max_size=12), seq_len=st.integers(1, 17))
def test_packing_loses_and_duplicates_nothing(lengths, seq_len):
  rng = np.random.default_rng(sum(lengths) + seq_len)
  docs = [np.append(rng.integers(3, 100, n), 2) for n in lengths]  # each ends in EOS
  rows = _pack(docs, seq_len)
  stream = np.concatenate(docs) if docs else np.zeros(0, int)
  tokens = np.concatenate([r["tokens"] for r in rows]) if rows else np.zeros(0, int)
  segs = np.concatenate([r["segment_ids"] for r in rows]) if rows else np.zeros(0, int)
  np.testing.assert_array_equal(tokens[segs > 0], stream)   # same tokens, same order
  assert np.all(tokens[segs == 0] == 0)                     # padding only at the very end
  assert all(len(r["tokens"]) == seq_len for r in rows)
  assert np.all(segs[: len(stream)] > 0) and np.all(segs[len(stream):] == 0)
  for r in rows:  # positions restart at each segment; segment ids count up from 1
    for s in np.unique(r["segment_ids"][r["segment_ids"] > 0]):
      np.testing.assert_array_equal(r["positions"][r["segment_ids"] == s],
                                    np.arange(np.sum(r["segment_ids"] == s)))
    nz = r["segment_ids"][r["segment_ids"] > 0]
    np.testing.assert_array_equal(np.unique(nz), np.arange(1, len(np.unique(nz)) + 1))


def test_lm_example_targets_stay_in_segment():
  tokens = np.array([[5, 6, 2, 7, 8, 2, 0, 0]])
  segs = np.array([[1, 1, 1, 2, 2, 2, 0, 0]])
  targets, weights = packing.lm_example(tokens, segs)
  np.testing.assert_array_equal(targets, [[6, 2, 7, 8, 2, 0, 0, 0]])
  np.testing.assert_array_equal(weights, [[1, 1, 0, 1, 1, 0, 0, 0]])


def _docs(cfg, tokenizer, n, **kw):
  """The first n documents' first tokens (an id of each document) of tokenized_documents."""
  it = iter(input_pipeline.tokenized_documents(cfg, tokenizer, "train", **kw))
  out = [tuple(next(it)["tokens"][:24]) for _ in range(n)]
  it.close()
  return out


def test_each_epoch_is_a_new_seeded_shuffle_of_all_documents(small_corpus, tokenizer):
  cfg = small_data_config(small_corpus)
  two = _docs(cfg, tokenizer, 2 * N_TRAIN, shuffle=True, repeat=True)
  stored = _docs(cfg, tokenizer, N_TRAIN, shuffle=False, repeat=False)
  assert sorted(two[:N_TRAIN]) == sorted(two[N_TRAIN:]) == sorted(stored)  # every document once
  assert two[:N_TRAIN] != two[N_TRAIN:] and two[:N_TRAIN] != stored
  assert two == _docs(cfg, tokenizer, 2 * N_TRAIN, shuffle=True, repeat=True)  # seeded
  assert two != _docs(small_data_config(small_corpus, seed=1), tokenizer, 2 * N_TRAIN,
                      shuffle=True, repeat=True)


def test_hosts_read_disjoint_documents(small_corpus, tokenizer):
  cfg = small_data_config(small_corpus)
  hosts = [_docs(cfg, tokenizer, N_TRAIN // 2, shuffle=True, repeat=True, shard_index=i, shard_count=2)
           for i in range(2)]
  everything = _docs(cfg, tokenizer, N_TRAIN, shuffle=True, repeat=True)
  assert hosts[0] == everything[0::2] and hosts[1] == everything[1::2]
  assert input_pipeline.host_batch_size(8, 2) == 4
  with pytest.raises(ValueError, match="does not split over 3 hosts"):
    input_pipeline.host_batch_size(8, 3)


class _CountingSource:
  def __init__(self, source):
    self.source, self.reads = source, 0

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    self.reads += 1
    return self.source[i]


def _batches(cfg, tokenizer, n, state=None):
  it = iter(input_pipeline.batches(cfg, tokenizer, "train", 512, train=True))
  if state is not None:
    it.set_state(json.loads(json.dumps(state)))  # as checkpoints store it
  out = [next(it) for _ in range(n)]
  state = it.get_state()
  it.close()
  return out, state


def test_train_batches_resume_exactly_and_in_constant_reads(small_corpus, tokenizer, monkeypatch):
  cfg = small_data_config(small_corpus, seq_len=1024, batch_size=32, read_threads=1, shuffle_rows=64)
  straight, _ = _batches(cfg, tokenizer, 40)  # several epochs
  _, state = _batches(cfg, tokenizer, 36)
  # Documents read before the saved batch's shuffle window.
  position = state["parent_window_start_state"]["parent_state"]["next_index"]
  assert position > 3 * N_TRAIN
  counted = []
  real = input_pipeline.random_access
  monkeypatch.setattr(input_pipeline, "random_access",
                      lambda *a: counted.append(_CountingSource(real(*a))) or counted[-1])
  resumed, _ = _batches(cfg, tokenizer, 4, state)
  for a, b in zip(straight[36:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # Restoring reads one shuffle window, the 4 batches and a few ahead, not what came before.
  assert counted[0].reads < position // 2, (counted[0].reads, state)


def test_resume_at_the_start_of_a_window(small_corpus, tokenizer):
  """The window's start state has no unfinished document: after JSON it must still say so."""
  cfg = small_data_config(small_corpus, shuffle_rows=16)
  straight, _ = _batches(cfg, tokenizer, 4)
  _, state = _batches(cfg, tokenizer, 1)
  resumed, _ = _batches(cfg, tokenizer, 3, state)
  for a, b in zip(straight[1:], resumed):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_train_rows_are_shuffled_in_windows(small_corpus, tokenizer):
  in_order, _ = _batches(small_data_config(small_corpus, shuffle_rows=0), tokenizer, 4)
  windowed, _ = _batches(small_data_config(small_corpus, shuffle_rows=16), tokenizer, 4)
  for i in (0, 2):  # each window of 16 rows (2 batches) is a permutation of the same rows
    a = np.concatenate([b["inputs"] for b in in_order[i:i + 2]])
    b = np.concatenate([b["inputs"] for b in windowed[i:i + 2]])
    assert sorted(map(bytes, a)) == sorted(map(bytes, b)) and not np.array_equal(a, b)


def test_a_dataset_prepared_as_tfrecord_streams_the_same_documents(small_corpus, tokenizer, tmp_path):
  streamed = small_data_config((small_corpus[0], str(tmp_path)), file_format="tfrecord",
                               tokenizer_path=tokenizer.path)
  assert documents.random_access(streamed, "train") is None
  assert (_docs(streamed, tokenizer, N_TRAIN, shuffle=False, repeat=False)
          == _docs(small_data_config(small_corpus), tokenizer, N_TRAIN, shuffle=False, repeat=False))
  straight, _ = _batches(streamed, tokenizer, 6)
  _, state = _batches(streamed, tokenizer, 4)
  assert "documents_read" in str(state)  # resumes by re-reading the stream
  resumed, _ = _batches(streamed, tokenizer, 2, state)
  for a, b in zip(straight[4:], resumed):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_real_tfds_dataset_path_with_mock_data(tmp_path):
  import tensorflow_datasets as tfds
  cfg = DataConfig(dataset="lm1b", data_dir=str(tmp_path), vocab_size=300, seq_len=32,
                   batch_size=4, eval_batches=2, tokenizer_lines=2000, eval_split="test")
  with tfds.testing.mock_data(num_examples=64):
    data = make_datasets(cfg, model_vocab_size=300)
    batch = next(data.train)
    data.train.close()
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
  data.train.close()
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
