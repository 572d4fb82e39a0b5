"""Checkpoint directories as untrusted input, without torch: every malformed directory is
refused with CheckpointFormatError naming the file and the problem (file names leaving the
directory, FIFOs, corrupt safetensors headers, broken indexes, bad config.json fields),
never read outside the directory, hung on or half-read; random corruptions of a valid
checkpoint are refused or import bit-exactly. Also the errors that need no reference
model: every named import error, what export refuses, config.json round trips."""

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import tempfile
import time

import numpy as np
import pytest
from flax import nnx
from hypothesis import event, given, settings, strategies as st

from moe.hub.hf_config import CheckpointFormatError, config_from_hf, config_to_hf
from moe.hub.safetensors_export import export_checkpoint, public_tensors
from moe.hub.safetensors_header import MAX_HEADER_BYTES
from moe.hub.safetensors_import import CONFIG, INDEX, import_checkpoint
from moe.model.decoder import Transformer
from tests import hub_fixtures as fx

CAP = 60_000  # bytes per shard: fx.HF's model in f32 is 7 shards
SHARD1 = "model-00001-of-00007.safetensors"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """(directory, {public name: f32 array}) of fx.HF's model with random weights, written
  once by moe's own exporter in 7 shards; tests copy it before breaking it."""
  cfg = config_from_hf(fx.HF, dtype="float32", param_dtype="float32")
  _, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
  d = str(tmp_path_factory.mktemp("hostile") / "tiny")
  files = export_checkpoint(d, cfg, params, "float32", CAP, bos_id=0, eos_id=1)
  assert SHARD1 in files and INDEX in files
  return d, dict(public_tensors(cfg, params))


@contextlib.contextmanager
def deadline(seconds: int):
  """Fail, not hang, if the body blocks (opening a FIFO for reading waits for a writer)."""
  def fire(*_):
    raise TimeoutError(f"still running after {seconds} s: the import blocked")
  old = signal.signal(signal.SIGALRM, fire)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def copy(ckpt, tmp_path) -> str:
  d = str(tmp_path / "ckpt")
  shutil.copytree(ckpt[0], d)
  return d


def refused(d: str, words: str) -> str:
  """Import `d` (no more than 20 s), assert CheckpointFormatError matching `words`."""
  with deadline(20), pytest.raises(CheckpointFormatError, match=words) as e:
    import_checkpoint(d, dtype="float32")
  return str(e.value)


def edit_json(path, fn):
  with open(path) as f:
    obj = json.load(f)
  fn(obj)  # edits in place
  with open(path, "w") as f:
    json.dump(obj, f)


def header_of(path) -> tuple[int, dict]:
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    return n, json.loads(f.read(n))


def edit_header(path, fn):
  """Rewrite a safetensors file's JSON header as fn(header) leaves it; the data untouched."""
  n, header = header_of(path)
  fn(header)
  with open(path, "rb") as f:
    data = f.read()[8 + n:]
  raw = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little") + raw + data)


def by_offset(header) -> list[str]:
  return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


# ---------------------------------------------------------------------------------------
# File names from the index stay in the directory; only regular files are opened.

def _outside_copy(ckpt, tmp_path) -> str:
  """A valid copy of shard 1 outside the directory: read, it would import fine."""
  os.makedirs(tmp_path / "outside")
  shutil.copy(os.path.join(ckpt[0], SHARD1), tmp_path / "outside" / "x.safetensors")
  return str(tmp_path / "outside" / "x.safetensors")


def _point_index(d, old, new):
  edit_json(os.path.join(d, INDEX), lambda idx: idx["weight_map"].update(
      {k: new for k, v in idx["weight_map"].items() if v == old}))


def test_index_path_traversal_is_refused(ckpt, tmp_path):
  d = copy(ckpt, tmp_path)
  _outside_copy(ckpt, tmp_path)
  _point_index(d, SHARD1, "../outside/x.safetensors")
  refused(d, rf"{re.escape(INDEX)} names file '\.\./outside/x\.safetensors': not a plain file name")


def test_index_absolute_path_is_refused(ckpt, tmp_path):
  d = copy(ckpt, tmp_path)
  outside = _outside_copy(ckpt, tmp_path)
  _point_index(d, SHARD1, outside)
  refused(d, rf"{re.escape(INDEX)} names file '{re.escape(outside)}': not a plain file name")


@pytest.mark.parametrize("name", [".", "..", "", "sub/x.safetensors"])
def test_index_names_that_are_not_plain_file_names_are_refused(ckpt, tmp_path, name):
  d = copy(ckpt, tmp_path)
  _point_index(d, SHARD1, name)
  refused(d, rf"{re.escape(INDEX)} names file '{re.escape(name)}': not a plain file name")


def test_a_symlink_out_of_the_directory_is_refused_one_inside_is_read(ckpt, tmp_path):
  d = copy(ckpt, tmp_path)
  outside = _outside_copy(ckpt, tmp_path)
  os.remove(os.path.join(d, SHARD1))
  os.symlink(outside, os.path.join(d, SHARD1))
  refused(d, rf"{re.escape(SHARD1)}: a symlink to .*outside/x.safetensors, outside the checkpoint directory")
  os.remove(os.path.join(d, SHARD1))
  shutil.copy(outside, os.path.join(d, "blob"))
  os.symlink("blob", os.path.join(d, SHARD1))  # as a download cache might link it
  imported = import_checkpoint(d, dtype="float32")
  assert all(np.array_equal(t, ckpt[1][name]) for name, t in public_tensors(imported.model_cfg, imported.params))


def test_a_hub_cache_snapshot_reads_its_blobs_and_nothing_else(ckpt, tmp_path):
  """<repo>/snapshots/<rev>/ links each file to <repo>/blobs/<hash>, as the hub cache does."""
  repo = tmp_path / "models--someone--tiny"
  snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
  os.makedirs(snap)
  os.makedirs(blobs)
  for i, name in enumerate(sorted(os.listdir(ckpt[0]))):
    shutil.copy(os.path.join(ckpt[0], name), blobs / f"blob{i}")
    os.symlink(os.path.join("..", "..", "blobs", f"blob{i}"), snap / name)
  imported = import_checkpoint(str(snap), dtype="float32")
  assert all(np.array_equal(t, ckpt[1][name]) for name, t in public_tensors(imported.model_cfg, imported.params))
  outside = _outside_copy(ckpt, tmp_path)  # a link elsewhere from a snapshot: still refused
  os.remove(snap / SHARD1)
  os.symlink(outside, snap / SHARD1)
  refused(str(snap), rf"{re.escape(SHARD1)}: a symlink to .*outside/x.safetensors, outside")


@pytest.mark.parametrize("file", [SHARD1, INDEX, CONFIG])
def test_a_fifo_is_refused_without_waiting_for_a_writer(ckpt, tmp_path, file):
  d = copy(ckpt, tmp_path)
  os.remove(os.path.join(d, file))
  os.mkfifo(os.path.join(d, file))
  start = time.monotonic()
  refused(d, rf"{re.escape(os.path.join(d, file))}: a FIFO, not a regular file")
  assert time.monotonic() - start < 10


def test_a_directory_in_place_of_a_shard_is_refused(ckpt, tmp_path):
  d = copy(ckpt, tmp_path)
  os.remove(os.path.join(d, SHARD1))
  os.mkdir(os.path.join(d, SHARD1))
  refused(d, rf"{re.escape(SHARD1)}: a directory, not a regular file")


# ---------------------------------------------------------------------------------------
# Safetensors headers: offsets tile the data exactly, every field's type and range.

def _set(field, value, which=0):
  """Header edit: the `which`-th tensor by offset gets header field `field` = value."""
  def go(h):
    h[by_offset(h)[which]][field] = value
  return go


def _overlap(h):
  a, b = by_offset(h)[:2]
  begin, end = h[b]["data_offsets"]
  h[b]["data_offsets"] = [begin - 4, end - 4]  # same size, 4 bytes into a's


# {case: (header edit, the error's words after the file name; {t0}: the first tensor's name)}
T0 = "tensor '{t0}': "
HEADER_EDITS = {
    "negative offset [-8, 8]": (_set("data_offsets", [-8, 8]), T0 + r"data_offsets \[-8, 8\] are not two integers"),
    "overlapping tensors": (_overlap, r"tensor '.*'s bytes \[\d+, \d+\) overlap tensor '.*'s, which end at \d+"),
    "3-element data_offsets": (_set("data_offsets", [0, 16, 32]), T0 + r"data_offsets \[0, 16, 32\] are not two"),
    "offsets reversed": (_set("data_offsets", [16, 0]), T0 + r"data_offsets \[16, 0\] are not two integers 0 <= begin"),
    "float offsets": (_set("data_offsets", [0.0, 16.0]), T0 + r"data_offsets \[0.0, 16.0\] are not"),
    "gap": (lambda h: h.pop(by_offset(h)[1]),
            r"tensor '.*'s bytes \[\d+, \d+\) leave bytes \[\d+, \d+\) that no tensor owns"),
    "bytes for another shape": (_set("shape", [1]), T0 + r"bytes \[0, \d+\) do not hold F32 \[1\] \(4 bytes\)"),
    "negative dim": (_set("shape", [-1, 32]), T0 + r"shape \[-1, 32\] is not a list of non-negative integers"),
    "bool dim": (_set("shape", [True]), T0 + r"shape \[True\] is not a list"),
    "dtype not a string": (_set("dtype", 4), T0 + r"dtype 4 is not a string"),
    "entry not an object": (lambda h: h.update({by_offset(h)[0]: [0, 16]}),
                            T0 + "header entry is a list, not an object"),
    "entry without dtype": (lambda h: h[by_offset(h)[0]].pop("dtype"), T0 + r"header entry has no \['dtype'\]"),
    "metadata not strings": (lambda h: h.update(__metadata__={"format": 1}),
                             "__metadata__ is not an object of strings"),
}


@pytest.mark.parametrize("edit", list(HEADER_EDITS))
def test_a_malformed_header_is_refused_naming_the_file_and_tensor(ckpt, tmp_path, edit):
  d = copy(ckpt, tmp_path)
  path = os.path.join(d, SHARD1)
  change, words = HEADER_EDITS[edit]
  words = words.replace("{t0}", re.escape(by_offset(header_of(path)[1])[0]))
  edit_header(path, change)
  refused(d, rf"{re.escape(path)}: {words}")


def test_a_header_over_the_formats_cap_is_refused_unread(ckpt, tmp_path):
  d = copy(ckpt, tmp_path)
  path = os.path.join(d, SHARD1)
  with open(path, "wb") as f:  # sparse: large enough to hold the header it claims
    f.write((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{")
    f.truncate(MAX_HEADER_BYTES + 64)
  refused(d, rf"{re.escape(path)}: not a readable safetensors file \(header length {MAX_HEADER_BYTES + 1} "
             rf"is over the format's cap of {MAX_HEADER_BYTES} bytes\)")


def test_appended_bytes_are_refused(ckpt, tmp_path):
  d = copy(ckpt, tmp_path)
  with open(os.path.join(d, SHARD1), "ab") as f:
    f.write(b"\0" * 12)
  refused(d, rf"{re.escape(SHARD1)}: 12 bytes after the last tensor's end \(appended or corrupt\)")


# ---------------------------------------------------------------------------------------
# The index and config.json: JSON objects with the fields they need.

@pytest.mark.parametrize("content, words", [
    ({"metadata": {"total_size": 0}}, r"no 'weight_map' object of tensor name -> shard file name \(got NoneType\)"),
    ({"weight_map": [SHARD1]}, r"no 'weight_map' object .*\(got list\)"),
    ({"weight_map": {"lm_head.weight": 7}}, r"weight_map\['lm_head.weight'\] = 7 is not a file name"),
    ("not json {", r"not valid JSON"),
    ([1, 2], r"holds a JSON list, not an object")])
def test_a_malformed_index_is_refused(ckpt, tmp_path, content, words):
  d = copy(ckpt, tmp_path)
  with open(os.path.join(d, INDEX), "w") as f:
    f.write(content if isinstance(content, str) else json.dumps(content))
  refused(d, rf"{re.escape(os.path.join(d, INDEX))}: {words}")


CONFIG_EDITS = {
    "0 heads": (dict(num_attention_heads=0), r"num_attention_heads=0: must be between 1 and 32"),
    "heads not dividing": (dict(num_attention_heads=3), r"num_attention_heads=3: must divide hidden_size=32"),
    "odd head dim": (dict(num_attention_heads=32), r"num_attention_heads=32: must divide .* even head dim"),
    "string for a number": (dict(hidden_size="32"), r"hidden_size='32': must be an integer, not str"),
    "bool for an int": (dict(num_hidden_layers=True), r"num_hidden_layers=True: must be an integer, not bool"),
    "float for an int": (dict(intermediate_size=48.0), r"intermediate_size=48.0: must be an integer, not float"),
    "negative size": (dict(moe_intermediate_size=-16), r"moe_intermediate_size=-16: must be between 0 and"),
    "negative vocab": (dict(vocab_size=-1), r"vocab_size=-1: must be between 1 and"),
    "top-k above the expert count": (dict(num_experts_per_tok=9),
                                     r"num_experts_per_tok=9: top-k must be between 1 and n_routed_experts=8"),
    "top-k 0": (dict(num_experts_per_tok=0), r"num_experts_per_tok=0: top-k must be between 1"),
    "no expert width": (dict(moe_intermediate_size=None), r"moe_intermediate_size=None: must be set"),
    "too many layers": (dict(num_hidden_layers=10**9), r"num_hidden_layers=1000000000: must be between 1 and 65536"),
    "experts x layers": (dict(num_hidden_layers=32, n_routed_experts=65536),
                         r"n_routed_experts=65536: x num_hidden_layers=32 is over 1048576 experts"),
    "dense prefix past the layers": (dict(first_k_dense_replace=5), r"first_k_dense_replace=5: must be between 0 and 4"),
    "NaN eps": (dict(rms_norm_eps=float("nan")), r"rms_norm_eps=nan: must be a finite number > 0"),
    "infinite theta": (dict(rope_theta=float("inf")), r"rope_theta=inf: must be a finite number > 0"),
    "negative alpha": (dict(aux_loss_alpha=-0.1), r"aux_loss_alpha=-0.1: must be a finite number >= 0"),
    "string bool": (dict(norm_topk_prob="false"), r"norm_topk_prob='false': must be true or false"),
    "rope_parameters a list": (dict(rope_parameters=[1]), r"rope_parameters=\[1\]: must be an object"),
    "bool for n_group": (dict(topk_method="group_limited_greedy", n_group=True), r"n_group=True: must be an integer"),
    "name not a string": (dict(_name_or_path=3), r"_name_or_path=3: must be a string"),
    "string kv heads": (dict(num_key_value_heads="4"), r"num_key_value_heads='4': must be an integer"),
}


@pytest.mark.parametrize("edit", list(CONFIG_EDITS))
def test_a_bad_config_field_is_refused_by_name(ckpt, tmp_path, edit):
  d = copy(ckpt, tmp_path)
  fields, words = CONFIG_EDITS[edit]
  edit_json(os.path.join(d, CONFIG), lambda hf: hf.update(fields))
  refused(d, rf"^config\.json: {words}")


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads"])
def test_a_config_missing_a_required_field_is_refused_by_name(ckpt, tmp_path, field):
  d = copy(ckpt, tmp_path)
  edit_json(os.path.join(d, CONFIG), lambda hf: hf.pop(field))
  refused(d, rf"^config\.json: {field} is missing")


@pytest.mark.parametrize("content, words", [("{", "not valid JSON"), ("[]", "holds a JSON list, not an object"),
                                            ("\xff", "not valid JSON"), ("[" * 100_000, "not valid JSON")])
def test_a_config_that_is_not_a_json_object_is_refused(ckpt, tmp_path, content, words):
  d = copy(ckpt, tmp_path)
  with open(os.path.join(d, CONFIG), "w", encoding="latin-1") as f:
    f.write(content)
  refused(d, rf"{re.escape(os.path.join(d, CONFIG))}: {words}")


# ---------------------------------------------------------------------------------------
# Every named error of a well-formed directory (moved from test_hub.py: no torch needed).

def _breakages(d, tmp, tensors):
  """{breakage: (how to write the broken directory `tmp`, the error's words)}."""
  hf = {}
  if d:
    with open(os.path.join(d, CONFIG)) as f:
      hf = json.load(f)

  def write(tensors=tensors, hf=hf):
    fx.write_numpy_checkpoint(tmp, tensors, hf, CAP)

  def copy_then(fn):
    def go():
      shutil.copytree(d, tmp)
      fn()
    return go

  def edit_map(fn):
    edit_json(os.path.join(tmp, INDEX), lambda idx: fn(idx["weight_map"]))

  def truncate(path):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) - 100)

  def first():
    return os.path.join(tmp, SHARD1)
  t = dict(tensors)
  return {
      "missing shard file": (copy_then(lambda: os.remove(glob.glob(os.path.join(tmp, "model-00002-of-*"))[0])),
                             r"names shard file 'model-00002-of-\d+.safetensors' \(\d+ tensors"),
      "index names a tensor no shard holds": (
          copy_then(lambda: edit_map(lambda m: m.update({"model.layers.0.mlp.extra.weight": m["lm_head.weight"]}))),
          r"places tensor 'model.layers.0.mlp.extra.weight' in shard 'model-\d+-of-\d+.safetensors', which does not hold it"),
      "shard holds a tensor the index does not name": (
          copy_then(lambda: edit_map(lambda m: m.pop("model.norm.weight"))),
          r"holds tensor 'model.norm.weight', which model.safetensors.index.json does not name"),
      "shape": (lambda: write(dict(t, **{"model.layers.1.mlp.gate.weight": np.zeros((7, 32), np.float32)})),
                r"tensor 'model.layers.1.mlp.gate.weight' in 'model-\d+-of-\d+.safetensors' has shape \(7, 32\); "
                r"config.json implies \(8, 32\)"),
      "dtype": (lambda: write(dict(t, **{"model.norm.weight": np.zeros(32, np.int32)})),
                r"tensor 'model.norm.weight' in '.*' has dtype I32"),
      "missing tensor": (lambda: write({k: v for k, v in t.items() if k != "model.layers.2.mlp.experts.5.up_proj.weight"}),
                         r"1 tensor\(s\) missing, e.g. \['model.layers.2.mlp.experts.5.up_proj.weight'\]"),
      "unknown tensor": (lambda: write(dict(t, **{"model.layers.9.mlp.gate.weight": np.zeros((8, 32), np.float32)})),
                         r"1 unknown tensor\(s\) this model does not use, e.g. \['model.layers.9.mlp.gate.weight'\]"),
      "far too many layers": (lambda: write(hf=dict(hf, num_hidden_layers=4000)),
                              r"config.json implies at least \d+ tensors \(4000 layers, 8 routed experts\); "
                              r"the checkpoint holds 114"),
      "MLA": (lambda: write(hf=dict(hf, kv_lora_rank=512)), r"kv_lora_rank=512\): multi-head latent attention"),
      "tied embeddings": (lambda: write(hf=dict(hf, tie_word_embeddings=True)), "tie_word_embeddings=True"),
      "sigmoid scores": (lambda: write(hf=dict(hf, scoring_func="sigmoid")), "scoring_func='sigmoid'"),
      "selection bias": (lambda: write(hf=dict(hf, topk_method="noaux_tc", scoring_func="sigmoid")),
                         "topk_method='noaux_tc': the DeepSeek-MoE format holds no selection bias"),
      "V2 architecture": (lambda: write(hf=dict(hf, model_type="deepseek_v2")), "model_type='deepseek_v2'"),
      "grouped-query attention": (lambda: write(hf=dict(hf, num_key_value_heads=2)), "num_key_value_heads=2"),
      "no config": (copy_then(lambda: os.remove(os.path.join(tmp, CONFIG))), "no config.json"),
      "no weights": (copy_then(lambda: [os.remove(f) for f in glob.glob(os.path.join(tmp, "model*"))]),
                     "neither model.safetensors nor model.safetensors.index.json"),
      "corrupt shard": (copy_then(lambda: open(first(), "wb").write(b"junk" * 9)),
                        r"model-00001-of-\d+.safetensors: not a readable safetensors file"),
      "truncated shard": (copy_then(lambda: truncate(first())),
                          r"model-00001-of-\d+.safetensors: tensor '.*'s bytes \[\d+, \d+\) do not hold .* "
                          r"\(truncated or corrupt\)"),
  }


@pytest.mark.parametrize("breakage", list(_breakages("", "", {})))
def test_every_named_error(ckpt, tmp_path, breakage):
  d, tensors = ckpt
  tmp = str(tmp_path / "broken")
  write, words = _breakages(d, tmp, tensors)[breakage]
  write()
  refused(tmp, words)


def test_export_refuses_what_the_format_cannot_hold(ckpt, tmp_path):
  imported = import_checkpoint(ckpt[0], dtype="float32")
  for router, k in (("hash", 1), ("switch", 1), ("gshard", 2)):
    cfg = imported.model_cfg.replace(router=router, n_activated_experts=k)
    with pytest.raises(CheckpointFormatError, match=f"router='{router}'"):
      export_checkpoint(str(tmp_path / router), cfg, imported.params)
    assert not os.path.exists(tmp_path / router)  # refused before writing anything
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  with pytest.raises(CheckpointFormatError, match="is not empty"):
    export_checkpoint(str(tmp_path / "full"), imported.model_cfg, imported.params)


@pytest.mark.parametrize("fields", [dict(), dict(n_routed_experts=0, n_shared_experts=0, n_activated_experts=0,
                                                  expert_width=0, first_k_dense_replace=0),
                                    dict(moe_layer_freq=2, first_k_dense_replace=0, norm_topk_prob=True)])
def test_config_round_trip(fields):
  cfg = config_from_hf(fx.HF).replace(**fields)
  again = config_from_hf(config_to_hf(cfg, "bfloat16", 0, 1))
  assert again == cfg


# ---------------------------------------------------------------------------------------
# Random corruptions: refused, or the very same tensors.

JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**65, 2**65), st.sampled_from([0, 1, 2, 3, 4, 8, 9, 16, 32, 65536, -1]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.lists(st.integers(-4, 64), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
CONFIG_FIELDS = sorted(fx.HF) + ["head_dim", "rope_parameters", "n_group", "_name_or_path", "rope_scaling"]
KINDS = ["header byte", "header length", "header field", "shifted offsets", "truncate", "append", "rename",
         "remove", "fifo", "index entry", "config field"]


def corrupt(d: str, data) -> None:
  """One random corruption of the checkpoint directory `d`, drawn from `data`."""
  shards = sorted(os.path.basename(f) for f in glob.glob(os.path.join(d, "model-*.safetensors")))
  files = shards + [INDEX, CONFIG]
  kind = data.draw(st.sampled_from(KINDS), label="kind")
  event(kind)
  path = os.path.join(d, data.draw(st.sampled_from(shards), label="shard"))
  if kind == "header byte":  # the length prefix or the JSON header, never tensor data
    with open(path, "r+b") as f:
      f.seek(data.draw(st.integers(0, 8 + header_of(path)[0] - 1), label="at"))
      f.write(bytes([data.draw(st.integers(0, 255), label="byte")]))
  elif kind == "header length":  # the data section moves: its tensors' bytes would be misread
    n = header_of(path)[0] + data.draw(st.one_of(st.integers(-16, -1), st.integers(1, 16)), label="delta")
    with open(path, "r+b") as f:
      f.write(max(n, 0).to_bytes(8, "little"))
  elif kind == "shifted offsets":  # the same size elsewhere: other bytes, or the header's
    name = data.draw(st.sampled_from(by_offset(header_of(path)[1])), label="tensor")
    delta = data.draw(st.one_of(st.integers(-64, -1), st.integers(1, 64)), label="delta")
    edit_header(path, lambda h: h[name].update(data_offsets=[o + delta for o in h[name]["data_offsets"]]))
  elif kind == "header field":
    names = by_offset(header_of(path)[1]) + ["__metadata__", "new"]
    name, field = data.draw(st.sampled_from(names)), data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    value = data.draw(st.one_of(JSON_VALUES, st.lists(st.integers(-8, 70_000), max_size=3),
                                st.sampled_from(["F16", "BF16", "I32", "F64", "X"])), label="value")
    edit_header(path, lambda h: h.update({name: dict(h.get(name) or {}, **{field: value})}))
  elif kind == "truncate":
    with open(path, "r+b") as f:
      f.truncate(data.draw(st.integers(0, os.path.getsize(path) - 1), label="size"))
  elif kind == "append":
    with open(path, "ab") as f:
      f.write(data.draw(st.binary(min_size=1, max_size=64), label="bytes"))
  elif kind == "rename":
    new = data.draw(st.sampled_from([s for s in shards if s != os.path.basename(path)]
                                    + ["model.safetensors", "x.safetensors"]), label="new name")
    os.rename(path, os.path.join(d, new))
  elif kind in ("remove", "fifo"):
    path = os.path.join(d, data.draw(st.sampled_from(files), label="file"))
    os.remove(path)
    if kind == "fifo":
      os.mkfifo(path)
  elif kind == "index entry":
    weight_map = json.load(open(os.path.join(d, INDEX)))["weight_map"]
    name = data.draw(st.sampled_from(sorted(weight_map) + ["model.layers.0.mlp.extra.weight"]), label="tensor")
    value = data.draw(st.one_of(st.sampled_from(shards + ["../" + shards[0], "/" + shards[0], "", "."]),
                                st.text(max_size=12), JSON_VALUES, st.just("delete")), label="value")
    edit_json(os.path.join(d, INDEX), lambda idx: idx["weight_map"].pop(name, None) if value == "delete"
              else idx["weight_map"].update({name: value}))
  else:
    field = data.draw(st.sampled_from(CONFIG_FIELDS), label="field")
    value = data.draw(st.one_of(JSON_VALUES, st.just("delete")), label="value")
    edit_json(os.path.join(d, CONFIG), lambda hf: hf.pop(field, None) if value == "delete"
              else hf.update({field: value}))


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_random_corruptions_are_refused_or_read_bit_exactly(ckpt, data):
  with tempfile.TemporaryDirectory() as tmp:
    d = os.path.join(tmp, "ckpt")
    shutil.copytree(ckpt[0], d)
    corrupt(d, data)
    with deadline(60):
      try:
        imported = import_checkpoint(d, dtype="float32")
      except CheckpointFormatError:
        event("refused")
        return
      event("imported")
      got = dict(public_tensors(imported.model_cfg, imported.params))
  assert got.keys() == ckpt[1].keys()
  for name, t in got.items():  # config fields that leave the tensors alone (rope_theta, ...)
    assert t.dtype == ckpt[1][name].dtype and np.array_equal(t, ckpt[1][name]), name


def test_v2_v3_configs_name_their_attention_and_carry_their_routing():
  """A DeepSeek-V3 config.json is refused for its MLA attention, and the message gives the
  routing as ModelConfig fields; a group-limited DeepSeek-MoE-format config imports it."""
  from moe.hub.hf_config import CheckpointFormatError, config_from_hf

  v3 = dict(fx.HF, model_type="deepseek_v3", kv_lora_rank=512, q_lora_rank=1536,
            topk_method="noaux_tc", scoring_func="sigmoid", n_group=4, topk_group=2,
            routed_scaling_factor=2.5)
  with pytest.raises(CheckpointFormatError, match=r"model_type='deepseek_v3' \(kv_lora_rank=512, "
                     r"q_lora_rank=1536\): multi-head latent attention .* ModelConfig\(router='sigmoid_bias', "
                     r"routed_scaling_factor=2.5, n_group=4, topk_group=2\)"):
    config_from_hf(v3)
  cfg = config_from_hf(dict(fx.HF, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                            routed_scaling_factor=1.5))
  assert (cfg.router, cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor) == ("group_limited", 4, 2, 1.5)
  assert config_from_hf(dict(fx.HF, topk_method="greedy", n_group=8)).router == "topk"
