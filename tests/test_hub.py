"""The released checkpoint format as input and output: a sharded directory read straight
into the rules' shards on 8 devices, matching transformers' implementation; export and
re-import bit-exact, the export read back by transformers; tokenizers. The import's errors,
which need no reference model, are tests/test_hub_hostile.py's (they run without torch)."""

import glob
import json
import os
import sysconfig

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from tests.capabilities import import_or_skip

torch = import_or_skip("torch", "torch")
transformers = import_or_skip("transformers", "torch")

from data.text_tokenizer import with_bos, HFTokenizer, load_tokenizer  # noqa: E402
from moe.hub.safetensors_export import export_checkpoint, public_tensors  # noqa: E402
from moe.hub.safetensors_import import import_checkpoint  # noqa: E402
from moe.parallel import rules  # noqa: E402
from moe.parallel.mesh import MeshConfig, make_mesh  # noqa: E402
from tests import hub_fixtures as fx  # noqa: E402

LAYOUT = "fsdp:2,expert:2,tensor:2"  # every rule in play: embed, expert, widths


def some_texts(n=20):
  files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:n]
  return [open(f, encoding="utf-8", errors="replace").read() for f in files]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """(directory, reference model, public tensors) of a 4-layer checkpoint in 12 shards."""
  d = str(tmp_path_factory.mktemp("hub") / "tiny-deepseek-moe")
  ref, tensors = fx.make_checkpoint(d, some_texts())
  assert len(glob.glob(os.path.join(d, "model-*-of-*.safetensors"))) > 3
  return d, ref, tensors


def public_of(imported) -> dict[str, np.ndarray]:
  return dict(public_tensors(imported.model_cfg, imported.params))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_import_onto_a_mesh_gives_the_rules_shards_and_the_tensors(ckpt, dtype):
  d, _, tensors = ckpt
  mesh = make_mesh(MeshConfig(LAYOUT))
  imported = import_checkpoint(d, mesh, dtype=dtype)
  cfg = imported.model_cfg
  assert cfg.param_dtype == cfg.dtype == dtype and cfg.n_routed_experts == 8 and cfg.name == "tiny-deepseek-moe"
  for path, var in nnx.to_flat_state(imported.params):
    x = var.get_value()
    want = rules.partition_spec(var.get_metadata()["axes"], x.shape, mesh)
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, want), x.ndim), (path, x.sharding, want)
    assert x.dtype == jnp.dtype(dtype) and not x.sharding.is_fully_replicated, path
  got = public_of(imported)
  assert got.keys() == tensors.keys()
  for name, t in tensors.items():
    want = t if dtype == "float32" else t.astype(ml_dtypes.bfloat16)  # bf16: cast once
    assert got[name].dtype == want.dtype and np.array_equal(got[name], want), name


def test_imported_model_matches_transformers(ckpt):
  d, ref, tensors = ckpt
  imported = import_checkpoint(d, dtype="float32")  # one device
  model = nnx.merge(imported.graphdef, imported.params)
  tokens = np.random.default_rng(1).integers(0, fx.HF["vocab_size"], (2, 24))
  with torch.no_grad():
    h_ref = ref(torch.tensor(tokens)).last_hidden_state.numpy()
  h, _ = model.hidden_states(jnp.asarray(tokens))
  np.testing.assert_allclose(h, h_ref, rtol=1e-4, atol=1e-4)
  logits, _ = model(jnp.asarray(tokens))
  np.testing.assert_allclose(logits, h_ref @ tensors["lm_head.weight"].T, rtol=1e-4, atol=1e-4)
  assert np.std(h_ref) > 0.1  # not degenerate


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_then_import_is_bit_exact(ckpt, tmp_path, dtype):
  d, _, _ = ckpt
  imported = import_checkpoint(d, make_mesh(MeshConfig(LAYOUT)), dtype=dtype)
  out = str(tmp_path / "export")
  cap = 40_000
  files = export_checkpoint(out, imported.model_cfg, imported.params, dtype, cap, bos_id=0, eos_id=1)
  shards = [f for f in files if f.endswith(".safetensors")]
  assert len(shards) > 3 and "model.safetensors.index.json" in files and "config.json" in files
  for f in shards:  # capped (the largest tensor here is 20 KB), plus the JSON header
    assert os.path.getsize(os.path.join(out, f)) < cap + 8_000, f
  with open(os.path.join(out, "config.json")) as f:
    hf = json.load(f)
  assert hf["architectures"] == ["DeepseekForCausalLM"] and hf["model_type"] == "deepseek"
  assert hf["torch_dtype"] == dtype
  for field in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "n_routed_experts",
                "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace", "moe_layer_freq",
                "norm_topk_prob", "scoring_func", "aux_loss_alpha", "seq_aux", "rope_theta",
                "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                "eos_token_id"):
    assert hf[field] == fx.HF[field], field
  again = import_checkpoint(out, dtype=dtype)
  assert again.model_cfg == imported.model_cfg.replace(name="export")
  a, b = dict(nnx.to_flat_state(imported.params)), dict(nnx.to_flat_state(again.params))
  assert a.keys() == b.keys()
  for path in a:
    x, y = np.asarray(a[path].get_value()), np.asarray(b[path].get_value())
    assert x.dtype == y.dtype and np.array_equal(x, y), path


def test_transformers_reads_the_export(ckpt, tmp_path):
  """The exported files, read with safetensors' torch loader into a fresh reference model
  built from the exported config.json, give our model's hidden states."""
  from safetensors.torch import load_file

  d, _, _ = ckpt
  imported = import_checkpoint(d, dtype="float32")
  out = str(tmp_path / "export")
  export_checkpoint(out, imported.model_cfg, imported.params, "float32", 40_000, bos_id=0, eos_id=1)
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    files = set(json.load(f)["weight_map"].values())
  loaded = {k: v.numpy() for file in files for k, v in load_file(os.path.join(out, file)).items()}
  with open(os.path.join(out, "config.json")) as f:
    fresh = fx.reference_model(json.load(f), seed=1)  # other random weights, then overwritten
  fx.load_reference(fresh, loaded)
  tokens = np.random.default_rng(2).integers(0, fx.HF["vocab_size"], (2, 24))
  with torch.no_grad():
    h_ref = fresh(torch.tensor(tokens)).last_hidden_state.numpy()
  model = nnx.merge(imported.graphdef, imported.params)
  h, _ = model.hidden_states(jnp.asarray(tokens))
  np.testing.assert_allclose(h, h_ref, rtol=1e-4, atol=1e-4)
  logits, _ = model(jnp.asarray(tokens))
  np.testing.assert_allclose(logits, h_ref @ loaded["lm_head.weight"].T, rtol=1e-4, atol=1e-4)


def test_tokenizer_json_behind_the_interface(ckpt):
  d, _, _ = ckpt
  tok = load_tokenizer(d)
  assert isinstance(tok, HFTokenizer)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, None, fx.HF["vocab_size"])
  text = "def f(x):\n    return x + 1  # é\n"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and 0 not in ids and tok.decode(ids) == text
  assert tok.decode([0]) == fx.BOS
  # The released checkpoints read BOS first (add_bos_token absent: true, as LLaMA's).
  assert tok.add_bos and with_bos(tok, ids).tolist() == [0] + ids.tolist()
