"""Checkpoint directories in the exact released format, written here independently of
moe.hub: transformers' DeepSeek-OCR-2 text model (the v1 architecture) with random weights,
its tensors renamed to the public naming and saved with safetensors' torch writer in
size-capped shards with HF's index, a config.json, and a byte-level BPE tokenizer.json
trained with the `tokenizers` library. torch and transformers are imported where they are
used, so HF and save_shards serve tests that run without them."""

import json
import os

import numpy as np

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"  # the public tokenizer's
HF = dict(vocab_size=320, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
          n_shared_experts=2, num_experts_per_tok=3, rms_norm_eps=1e-6, max_position_embeddings=64,
          rope_theta=10000.0, first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False,
          tie_word_embeddings=False, scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True,
          architectures=["DeepseekForCausalLM"], model_type="deepseek", bos_token_id=0,
          eos_token_id=1, torch_dtype="float32")


def reference_model(hf=HF, seed=0):
  """A random DeepseekOcr2TextModel of config.json dict `hf`; every parameter redrawn."""
  import torch
  import transformers

  n = hf["num_hidden_layers"]
  kinds = ["dense" if i < hf["first_k_dense_replace"] or i % hf["moe_layer_freq"] else "sparse"
           for i in range(n)]
  cfg = transformers.DeepseekOcr2TextConfig(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], moe_intermediate_size=hf["moe_intermediate_size"],
      num_hidden_layers=n, num_attention_heads=hf["num_attention_heads"],
      num_key_value_heads=hf["num_key_value_heads"], n_routed_experts=hf["n_routed_experts"],
      n_shared_experts=hf["n_shared_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
      topk_method="greedy", routed_scaling_factor=1.0, n_group=1, topk_group=1,
      mlp_layer_types=kinds, rms_norm_eps=hf["rms_norm_eps"],
      max_position_embeddings=hf["max_position_embeddings"], attn_implementation="eager")
  torch.manual_seed(seed)
  model = transformers.DeepseekOcr2TextModel(cfg).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("layernorm.weight") or name == "norm.weight":
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.3 * torch.randn_like(p))
  return model


def public_tensors(model, lm_head: np.ndarray) -> dict[str, np.ndarray]:
  """The reference model's weights under the public names (per-expert tensors), f32."""
  out = {"lm_head.weight": np.asarray(lm_head, np.float32)}
  for name, t in model.state_dict().items():
    t = t.detach().float().numpy()
    if name.endswith("mlp.experts.gate_up_proj"):
      prefix, width = "model." + name[: -len("gate_up_proj")], t.shape[1] // 2
      for e in range(t.shape[0]):
        out[f"{prefix}{e}.gate_proj.weight"] = t[e, :width]
        out[f"{prefix}{e}.up_proj.weight"] = t[e, width:]
    elif name.endswith("mlp.experts.down_proj"):
      for e in range(t.shape[0]):
        out[f"model.{name[: -len('down_proj')]}{e}.down_proj.weight"] = t[e]
    else:
      out["model." + name] = t
  return out


def load_reference(model, tensors) -> None:
  """Load public-name tensors into a reference model (the inverse of public_tensors)."""
  import torch

  state = {}
  for name, t in model.state_dict().items():
    if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
      prefix = "model." + name.rsplit(".", 1)[0] + "."
      parts = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
      state[name] = torch.stack([torch.cat([torch.as_tensor(np.asarray(tensors[f"{prefix}{e}.{p}.weight"], np.float32))
                                            for p in parts]) for e in range(t.shape[0])])
    else:
      state[name] = torch.as_tensor(np.asarray(tensors["model." + name], np.float32))
  model.load_state_dict(state)


def write_checkpoint(directory, tensors, hf=HF, max_shard_bytes=None, dtype=None):
  """Write tensors as HF does: one model.safetensors, or model-0000i-of-0000n shards of at
  most max_shard_bytes plus model.safetensors.index.json; and config.json. dtype: the
  floating tensors' torch dtype (None: float32)."""
  import torch
  from safetensors.torch import save_file

  dtype = torch.float32 if dtype is None else dtype
  os.makedirs(directory, exist_ok=True)
  converted = {}
  for name, t in tensors.items():
    t = torch.as_tensor(np.ascontiguousarray(t))
    converted[name] = t.to(dtype) if t.is_floating_point() else t  # integer tensors: the dtype-error fixture
  save_shards(directory, split_shards(converted, max_shard_bytes, lambda t: t.numel() * t.element_size()),
              save_file)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf, f)


def write_numpy_checkpoint(directory, tensors, hf=HF, max_shard_bytes=None):
  """write_checkpoint with safetensors' numpy writer, the arrays as they are (no torch)."""
  from safetensors.numpy import save_file

  os.makedirs(directory, exist_ok=True)
  arrays = {name: np.ascontiguousarray(t) for name, t in tensors.items()}
  save_shards(directory, split_shards(arrays, max_shard_bytes, lambda t: t.nbytes), save_file)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf, f)


def split_shards(tensors, max_shard_bytes, nbytes):
  """{name: tensor} -> [{name: tensor}] in name order, each shard at most max_shard_bytes
  (None: one shard) unless one tensor alone is larger."""
  shards, current, size = [], {}, 0
  for name in sorted(tensors):
    if current and max_shard_bytes and size + nbytes(tensors[name]) > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name], size = tensors[name], size + nbytes(tensors[name])
  shards.append(current)
  return shards


def save_shards(directory, shards, save):
  """[{name: tensor}] -> one model.safetensors, or HF's model-0000i-of-0000n shards and
  model.safetensors.index.json; `save` is safetensors' torch or numpy save_file."""
  if len(shards) == 1:
    save(shards[0], os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save(shard, os.path.join(directory, file), metadata={"format": "pt"})
    weight_map.update({name: file for name in shard})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def write_tokenizer(directory, texts, vocab_size):
  """A byte-level BPE tokenizer.json (BOS id 0, EOS id 1) and tokenizer_config.json."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": {"content": BOS, "special": True}, "eos_token": EOS,
               "tokenizer_class": "LlamaTokenizerFast"}, f)
  return tok


def make_checkpoint(directory, texts, hf=HF, seed=0, max_shard_bytes=60_000):
  """A full released-format directory -> (reference model, public tensors)."""
  ref = reference_model(hf, seed)
  lm_head = np.random.default_rng(seed).normal(0, 0.3, (hf["vocab_size"], hf["hidden_size"]))
  tensors = public_tensors(ref, lm_head)
  write_checkpoint(directory, tensors, hf, max_shard_bytes)
  write_tokenizer(directory, texts, hf["vocab_size"])
  return ref, tensors
