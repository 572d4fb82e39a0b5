"""What experiments.generate (and the sample at the end of experiments.train) runs: a model
with its tokenizer from a training run or a public-format checkpoint directory, prompts in,
text and timing out. No flags here, so training can import it.
"""

from __future__ import annotations

import glob
import json
import os
import time
from typing import Any, NamedTuple, Sequence

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from moe.decode.generate import Decoder, graphdef_for
from moe.decode.sampling import Sampling
from moe.model.config import ModelConfig
from moe.parallel.mesh import BATCH_AXES


class Loaded(NamedTuple):
  cfg: ModelConfig
  graphdef: Any
  params: Any      # nnx.State of the model's Params
  tokenizer: Any   # encode(text) -> ids, decode(ids) -> text, eos_id
  mesh: Mesh | None
  data_cfg: Any = None  # a training run's DataConfig (None for a checkpoint directory)


def load_run(workdir: str, step: int | None = None, mesh: Mesh | None = None,
             dtype: str | None = None) -> Loaded:
  """A training run's parameters (its latest checkpoint, or `step`) and SentencePiece
  tokenizer; `dtype` overrides the compute dtype (the parameters keep theirs)."""
  from data.input_pipeline import tokenizer_for
  from moe.train.restore import restore_run

  run = restore_run(workdir, step, mesh)
  cfg, graphdef = run.model_cfg, run.graphdef
  if dtype and dtype != cfg.dtype:
    cfg = cfg.replace(dtype=dtype)
    graphdef = graphdef_for(cfg)
  return Loaded(cfg, graphdef, run.params, tokenizer_for(run.data_cfg), mesh, run.data_cfg)


class HFTokenizer:
  """A `tokenizer.json` (HF tokenizers) behind the SentencePiece Tokenizer's interface."""

  def __init__(self, path: str, eos_id: int):
    from tokenizers import Tokenizer

    self.tok, self.eos_id = Tokenizer.from_file(path), eos_id

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tok.encode(text).ids, np.int32)  # with the file's BOS rule

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_hf_checkpoint(directory: str, dtype: str = "bfloat16", mesh: Mesh | None = None) -> Loaded:
  """A public-format checkpoint directory (config.json, *.safetensors, tokenizer.json),
  parameters stored in `dtype`. Written against moe.hub's config_from_hf and
  load_public_checkpoint (all tensors read at once); the one place to swap for the hub's
  directory importer."""
  from safetensors import safe_open

  from moe.hub.hf_config import config_from_hf
  from moe.hub.hf_weights import load_public_checkpoint
  from moe.model.decoder import Transformer

  with open(os.path.join(directory, "config.json")) as f:
    hf = json.load(f)
  cfg = config_from_hf(hf, dtype=dtype, param_dtype=dtype)
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files in {directory!r}")
  tensors = {}
  for path in files:
    with safe_open(path, framework="flax") as f:  # flax: bf16 tensors load (numpy has no bf16)
      tensors.update({name: f.get_tensor(name) for name in f.keys()})
  model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))  # no random init to overwrite
  load_public_checkpoint(model, tensors)
  graphdef, params = nnx.split(model, nnx.Param)
  eos = hf.get("eos_token_id")
  tokenizer = HFTokenizer(os.path.join(directory, "tokenizer.json"),
                          -1 if eos is None else int(eos[0] if isinstance(eos, list) else eos))
  return Loaded(cfg, graphdef, params, tokenizer, mesh)


def decode_batch(n_prompts: int, mesh: Mesh | None) -> int:
  """Rows of the decoder: the prompts, rounded up to split over the mesh's batch axes."""
  shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  return -(-n_prompts // shards) * shards


def generate_text(loaded: Loaded, prompts: Sequence[str], max_new_tokens: int,
                  sampling: Sampling = Sampling(), seed: int = 0, warmup: bool = True,
                  prompt_ids: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
  """Continuations of `prompts` (or of `prompt_ids`, already tokenised): ids, text, timing.
  `warmup` compiles first (a 1-token run), so the timing is of compiled code."""
  tok = loaded.tokenizer
  ids = [list(map(int, p)) for p in prompt_ids] if prompt_ids is not None else \
        [tok.encode(p).tolist() for p in prompts]
  decoder = Decoder(loaded.graphdef, loaded.params, decode_batch(len(ids), loaded.mesh),
                    max(map(len, ids)) + max_new_tokens, loaded.mesh)
  t0 = time.perf_counter()
  if warmup:
    decoder.generate(ids, 1, sampling, seed, tok.eos_id)
  compile_s = time.perf_counter() - t0
  out = decoder.generate(ids, max_new_tokens, sampling, seed, tok.eos_id)
  texts = [tok.decode([t for t in row if t != tok.eos_id]) for row in out.tokens]
  return {"prompts": [tok.decode(p) for p in ids], "prompt_ids": ids,
          "generated_ids": [row.tolist() for row in out.tokens], "texts": texts,
          "max_new_tokens": max_new_tokens, "sampling": sampling._asdict(), "seed": seed,
          "dtype": loaded.cfg.dtype, "batch": decoder.batch, "max_len": decoder.max_len,
          "compile_s": compile_s, "prefill_s": out.prefill_s, "decode_s": out.decode_s,
          "new_tokens": out.n_tokens, "tokens_per_s": out.n_tokens / max(out.decode_s, 1e-9)}


def held_out_prompt(data_cfg, n_lines: int = 4) -> str:
  """A few lines of the first held-out document: from its first `def` line when it has one."""
  from data.documents import documents

  for text in documents(data_cfg, data_cfg.eval_split):
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("def ")] or [0]
    chosen = lines[starts[0]:starts[0] + n_lines]
    if any(line.strip() for line in chosen):
      return "\n".join(chosen) + "\n"
  raise ValueError(f"split {data_cfg.eval_split!r} of {data_cfg.dataset!r} has no text")


def sample_continuation(workdir: str, n_tokens: int = 48, mesh: Mesh | None = None) -> dict[str, Any]:
  """A greedy continuation of a held-out prompt by a run's latest checkpoint; the prompt
  is cut to fit the run's training context (seq_len) with the new tokens."""
  loaded = load_run(workdir, mesh=mesh)
  ids = loaded.tokenizer.encode(held_out_prompt(loaded.data_cfg))
  ids = ids[:max(loaded.data_cfg.seq_len - n_tokens, 8)]
  return generate_text(loaded, [], n_tokens, warmup=False, prompt_ids=[ids])


def format_result(out: dict[str, Any]) -> str:
  """Each prompt and its continuation, then the timing."""
  parts = []
  for prompt, text in zip(out["prompts"], out["texts"]):
    parts.append(f"--- prompt ---\n{prompt}\n--- continuation ---\n{text}")
  parts.append(f"{out['new_tokens']} new tokens in {out['decode_s']:.3f} s: "
               f"{out['tokens_per_s']:.1f} tokens/s (batch {out['batch']}, {out['dtype']}; "
               f"prefill {out['prefill_s']:.3f} s, compile {out['compile_s']:.1f} s)")
  return "\n".join(parts)
