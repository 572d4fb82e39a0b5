"""What experiments.generate (and the sample at the end of experiments.train) runs: a model
with its tokenizer from a training run or a public-format checkpoint directory, prompts in,
text and timing out. No flags here, so training can import it.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
from jax.sharding import Mesh

from data.text_tokenizer import with_bos
from moe.decode.generate import Decoder
from moe.decode.sampling import Sampling
from moe.parallel.mesh import BATCH_AXES
# Loading lives with the restore (lm-eval's adapter, moe.train.harness, loads the same way).
from moe.train.restore import Loaded, load_hf_checkpoint, load_run  # noqa: F401


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
        [with_bos(tok, tok.encode(p)).tolist() for p in prompts]
  decoder = Decoder(loaded.graphdef, loaded.params, decode_batch(len(ids), loaded.mesh),
                    max(map(len, ids)) + max_new_tokens, loaded.mesh)
  t0 = time.perf_counter()
  if warmup:
    decoder.generate(ids, 1, sampling, seed, tok.eos_id)
  compile_s = time.perf_counter() - t0
  out = decoder.generate(ids, max_new_tokens, sampling, seed, tok.eos_id)
  texts = [tok.decode([t for t in row if t != tok.eos_id]) for row in out.tokens]
  return {"prompts": [tok.decode(p[1:] if p[:1] == [tok.bos_id] else p) for p in ids], "prompt_ids": ids,
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


def sample_continuation(workdir: str, n_tokens: int = 48, mesh: Mesh | None = None,
                        sampling: Sampling = Sampling(), seed: int = 0,
                        loaded: Loaded | None = None) -> dict[str, Any]:
  """A continuation (greedy by default) of a held-out prompt by a run's latest checkpoint
  (or by `loaded`, already loaded from it); the prompt is cut to fit the run's training
  context (seq_len) with the new tokens."""
  loaded = loaded or load_run(workdir, mesh=mesh)
  ids = loaded.tokenizer.encode(held_out_prompt(loaded.data_cfg))
  ids = ids[:max(loaded.data_cfg.seq_len - n_tokens, 8)]
  return generate_text(loaded, [], n_tokens, sampling, seed, warmup=False, prompt_ids=[ids])


def format_result(out: dict[str, Any]) -> str:
  """Each prompt and its continuation, then the timing."""
  parts = []
  for prompt, text in zip(out["prompts"], out["texts"]):
    parts.append(f"--- prompt ---\n{prompt}\n--- continuation ---\n{text}")
  parts.append(f"{out['new_tokens']} new tokens in {out['decode_s']:.3f} s: "
               f"{out['tokens_per_s']:.1f} tokens/s (batch {out['batch']}, {out['dtype']}; "
               f"prefill {out['prefill_s']:.3f} s, compile {out['compile_s']:.1f} s)")
  return "\n".join(parts)
