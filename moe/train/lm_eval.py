"""Language-model evaluation of any parameters (a run's checkpoint or an imported public
one) on local files: perplexity of a text, and multiple-choice items scored by the
log-likelihood of each choice given its context.

    lm = LM(graphdef, params, mesh)
    perplexity(lm, tok, open('f.txt').read(), seq_len=1024)
    multiple_choice(lm, tok, [{'context': 'The capital of France is', 'choices': [' Paris', ' Rome'],
                               'answer': 0}], seq_len=1024)

Rows are scored by one jitted function: per row, the summed log-probability of the
weighted targets, its weight, and the MoE layers' routing statistics.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from data.text_tokenizer import TextTokenizer, with_bos
from moe.model.loss import real_tokens
from moe.parallel import rules
from moe.parallel.mesh import BATCH_AXES, use_mesh
from moe.train.metrics import token_weighted_mean
from moe.train.steps import put_batch


class LM(NamedTuple):
  graphdef: Any
  params: Any      # nnx.State of the model's Params (in their shards on `mesh`)
  mesh: Mesh | None = None


def _score(graphdef, mesh, params, batch):
  """-> (sum of weighted target log-probs [B], sum of weights [B], per-layer stats of the
  real tokens, number of real tokens, whether every weighted target is the argmax [B])."""
  with use_mesh(mesh):
    model = nnx.merge(graphdef, params)
    real = real_tokens(batch["segment_ids"], batch["weights"])
    logits, aux = model(batch["inputs"], batch["segment_ids"], batch["positions"], token_mask=real)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lp = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    w = batch["weights"].astype(jnp.float32)
    greedy = jnp.all((jnp.argmax(logp, axis=-1) == batch["targets"]) | (w == 0), axis=-1)
    return jnp.sum(lp * w, axis=-1), jnp.sum(w, axis=-1), aux["layers"], jnp.sum(real), greedy


@functools.lru_cache(maxsize=4)
def _scorer(graphdef, mesh):
  # On a mesh the parameters and the batch arrive in their shards; jit follows them.
  return jax.jit(functools.partial(_score, graphdef, mesh))


def batch_rows(mesh: Mesh | None) -> int:
  """The smallest batch that splits over the mesh's batch axes."""
  return 1 if mesh is None else math.prod(mesh.shape[a] for a in BATCH_AXES)


def score_rows(lm: LM, rows: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int,
               batch_size: int | None = None, with_greedy: bool = False):
  """rows: (ids [n + 1], weights [n]) with n <= seq_len: weights[i] counts the prediction
  of ids[i + 1] from ids[:i + 1]. -> (log-prob sums [R], weight sums [R], routing stats of
  the rows' tokens), and with_greedy: whether each row's weighted targets are all the
  model's argmax [R] (lm-eval's is_greedy). Rows are padded to seq_len and batches to
  batch_size rows; the padding is in segment 0, outside the routing statistics. One
  process: every row is this host's."""
  batch_size = batch_size or batch_rows(lm.mesh)
  rules.check_batch(lm.mesh, batch_size, "batch_size")
  fn = _scorer(lm.graphdef, lm.mesh)
  sums, counts, stats, tokens, greedy = [], [], [], [], []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    b = {k: np.zeros((batch_size, seq_len), np.int32) for k in ("inputs", "targets", "segment_ids")}
    b["weights"] = np.zeros((batch_size, seq_len), np.float32)
    b["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy()
    for r, (ids, weights) in enumerate(chunk):
      n = len(ids) - 1
      assert 0 < n <= seq_len and len(weights) == n, (len(ids), len(weights), seq_len)
      b["inputs"][r, :n], b["targets"][r, :n] = ids[:-1], ids[1:]
      b["weights"][r, :n], b["segment_ids"][r, :n] = weights, 1  # padding: its own segment 0
    lp, w, layer_stats, real, top = jax.device_get(fn(lm.params, put_batch(b, lm.mesh)))
    sums.append(lp[:len(chunk)])
    counts.append(w[:len(chunk)])
    greedy.append(top[:len(chunk)])
    stats.append(layer_stats)
    tokens.append(float(real))
  out = np.concatenate(sums), np.concatenate(counts), token_weighted_mean(stats, tokens)
  return out + (np.concatenate(greedy),) if with_greedy else out


def text_rows(ids: np.ndarray, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Token ids -> windows of seq_len predictions each (the last shorter), consecutive
  windows sharing one token, so every token after the first is predicted exactly once with
  the context since its window began."""
  return [(ids[s:s + seq_len + 1], np.ones(len(ids[s:s + seq_len + 1]) - 1, np.float32))
          for s in range(0, len(ids) - 1, seq_len)]


def perplexity(lm: LM, tok: TextTokenizer, text: str, seq_len: int,
               batch_size: int | None = None) -> dict[str, Any]:
  """NLL per token (nats) and perplexity of `text` (BOS first where the tokenizer says so: with_bos),
  in non-overlapping windows of seq_len, with the routing statistics over them."""
  ids = with_bos(tok, tok.encode(text))
  if len(ids) < 2:
    raise ValueError("the text has fewer than 2 tokens: nothing to predict")
  lp, n, layers = score_rows(lm, text_rows(ids, seq_len), seq_len, batch_size)
  nll = -float(lp.sum()) / float(n.sum())
  return {"nll": nll, "perplexity": math.exp(min(nll, 50.0)), "tokens": int(n.sum()),
          "windows": len(lp), "bits_per_byte": -float(lp.sum()) / math.log(2) / max(len(text.encode()), 1),
          "layers": layers}


def choice_row(tok: TextTokenizer, context: str, choice: str, seq_len: int):
  """(ids, weights) of a choice after its context: the choice's ids are those of context +
  choice past the context's own (as the pair tokenises), or the choice alone when the
  context's ids are not a prefix. Cut from the left to seq_len predictions."""
  ctx = with_bos(tok, tok.encode(context)).tolist()
  whole = with_bos(tok, tok.encode(context + choice)).tolist()
  cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else tok.encode(choice).tolist()
  if not cont or len(cont) > seq_len:
    raise ValueError(f"choice {choice!r} has {len(cont)} tokens; need 1 to seq_len={seq_len}")
  ids = np.asarray((ctx + cont)[-(seq_len + 1):], np.int32)
  weights = np.zeros(len(ids) - 1, np.float32)
  weights[-len(cont):] = 1.0
  return ids, weights


def multiple_choice(lm: LM, tok: TextTokenizer, items: Sequence[dict[str, Any]], seq_len: int,
                    batch_size: int | None = None) -> dict[str, Any]:
  """items: {'context': str, 'choices': [str], 'answer': index}. accuracy: the choice with
  the highest log-likelihood is the answer; accuracy_norm: the same with each choice's
  log-likelihood divided by its length in characters (per-character normalisation)."""
  rows = []
  for i, item in enumerate(items):
    if not 0 <= item["answer"] < len(item["choices"]):
      raise ValueError(f"item {i}: answer {item['answer']} is not an index into its {len(item['choices'])} choices")
    for choice in item["choices"]:
      rows.append(choice_row(tok, item["context"], choice, seq_len))
  lp, _, _ = score_rows(lm, rows, seq_len, batch_size)
  scores, correct, correct_norm, start = [], 0, 0, 0
  for item in items:
    s = lp[start:start + len(item["choices"])]
    start += len(item["choices"])
    per_char = s / np.asarray([max(len(c), 1) for c in item["choices"]])
    correct += int(np.argmax(s) == item["answer"])
    correct_norm += int(np.argmax(per_char) == item["answer"])
    scores.append(s.tolist())
  n = len(items)
  return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "items": n, "loglik": scores}
