"""lm-evaluation-harness (`lm-eval` 0.4.x, the `eval` extra) model `deepseekmoe_jax`: a
training run or a released-format checkpoint directory, scored and sampled by this code.

  python -m experiments.lm_eval --model deepseekmoe_jax --tasks hellaswag \
      --model_args "hf_checkpoint=DIR,dtype=bfloat16,mesh='fsdp:4,expert:2'"

model_args: workdir (a run; step: its checkpoint) or hf_checkpoint (a directory); dtype
(compute; default the run's own, bfloat16 for a directory); mesh (MeshConfig shape; ';'
may stand for ','); max_length (default the run's seq_len, the directory's
max_position_embeddings); max_gen_toks (default 256); seed (sampling). lm-eval's
batch_size is the rows of a batch at max_length (shorter rows go in bigger batches, at most
max_batch_size rows; moe.train.bucketed).

Requests become token rows as the project's own scoring pairs them
(moe.train.lm_eval.choice_row: BOS first where the tokenizer's config says so; a
continuation's ids are those of context + continuation past the context's), with
lm-eval's conventions on top: a context's trailing whitespace moves to the continuation; an
empty context is the prefix token (BOS, else EOS); a rolling log-likelihood sums lm-eval's
windows of max_length predictions (each token predicted once, a window after the first
with the most context that fits). generate_until runs moe.decode (EOS stops a row) and cuts
the text at the first stop sequence. Each call logs the (batch, length) shapes it used and
how many of them it compiled.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from lm_eval.api.model import LM as HarnessLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from data.text_tokenizer import TextTokenizer, with_bos
from moe.decode.sampling import Sampling
from moe.parallel.mesh import MeshConfig, make_mesh
from moe.train import lm_eval, restore
from moe.train.bucketed import BucketedGenerator, BucketedScorer

NAME = "deepseekmoe_jax"
DEFAULT_MAX_GEN_TOKS = 256
# Under lm-eval's logger, so its CLI shows these lines with its own (level: LMEVAL_LOG_LEVEL).
log = logging.getLogger(f"lm_eval.{NAME}")


def prefix_id(tok: TextTokenizer) -> int:
  """What an empty context is: BOS where the model reads one first, else EOS (lm-eval's)."""
  return tok.bos_id if tok.add_bos else tok.eos_id


def pair_row(tok: TextTokenizer, context: str, continuation: str, max_len: int):
  """(ids [n + 1], weights [n]) scoring `continuation` after `context`, cut from the left to
  max_len predictions."""
  spaces = len(context) - len(context.rstrip())
  if spaces:  # lm-eval: word-boundary whitespace belongs to the continuation
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  if context or tok.add_bos:
    return lm_eval.choice_row(tok, context, continuation, max_len)
  cont = tok.encode(continuation).tolist()
  return window_row([prefix_id(tok)], cont, max_len)


def window_row(context: list[int], pred: list[int], max_len: int):
  """(ids, weights): the predictions of `pred` after `context`, at most max_len in all."""
  if not 1 <= len(pred) <= max_len:
    raise ValueError(f"{len(pred)} tokens to score; need 1 to max_length={max_len}")
  ids = np.asarray((context + pred)[-(max_len + 1):], np.int32)
  weights = np.zeros(len(ids) - 1, np.float32)
  weights[-len(pred):] = 1.0
  return ids, weights


def rolling_rows(tok: TextTokenizer, text: str, max_len: int):
  """lm-eval's rolling windows of `text` after the prefix token, as rows."""
  windows = get_rolling_token_windows(tok.encode(text).tolist(), prefix_id(tok), max_len, 1)
  return [window_row(*make_disjoint_window(w), max_len) for w in windows]


def sampling_of(kwargs: dict[str, Any]) -> Sampling:
  """lm-eval's normalised generation kwargs -> moe.decode's settings (greedy unless do_sample)."""
  if not kwargs.get("do_sample"):
    return Sampling()
  return Sampling(float(kwargs.get("temperature") or 0.0), int(kwargs.get("top_k") or 0),
                  float(kwargs.get("top_p") or 1.0))


@register_model(NAME)
class DeepSeekMoELM(HarnessLM):
  """lm-eval's LM over a run (`workdir`) or a checkpoint directory (`hf_checkpoint`)."""

  def __init__(self, workdir: str | None = None, hf_checkpoint: str | None = None,
               step: int | None = None, dtype: str | None = None, mesh: str = "",
               max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
               seed: int = 0, batch_size: int | str = 1, max_batch_size: int | None = None,
               device: str | None = None, loaded: restore.Loaded | None = None):
    super().__init__()
    if loaded is None and (workdir is None) == (hf_checkpoint is None):
      raise ValueError(f"{NAME}: give exactly one of workdir=RUN and hf_checkpoint=DIR in --model_args")
    if device:
      log.warning("%s: device=%s ignored; JAX's devices (and mesh=) place the model", NAME, device)
    if loaded is None:
      m = make_mesh(MeshConfig(str(mesh).replace(";", ","))) if mesh else None
      loaded = (restore.load_run(workdir, step, m, dtype) if workdir else
                restore.load_hf_checkpoint(hf_checkpoint, dtype or "bfloat16", m))
    self.loaded, self.tok = loaded, loaded.tokenizer
    trained = loaded.data_cfg.seq_len if loaded.data_cfg is not None else loaded.cfg.max_seq_len
    self._max_length, self._max_gen_toks, self.seed = int(max_length or trained), int(max_gen_toks), int(seed)
    # "auto" (or anything not a number): one row at max_length per batch.
    rows = int(batch_size) if str(batch_size).isdigit() else 1
    self.scorer = BucketedScorer(lm_eval.LM(loaded.graphdef, loaded.params, loaded.mesh),
                                 self._max_length, rows, max_batch_size)
    self.generator = BucketedGenerator(loaded.graphdef, loaded.params, loaded.mesh, self._max_length,
                                       rows, max_batch_size)
    self.shapes: dict[str, set[tuple[int, int]]] = {}  # per request type: the (batch, length) used

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def tokenizer_name(self) -> str:
    return self.tok.path

  def get_model_info(self) -> dict[str, Any]:
    """Into lm-eval's results["config"]: the model and the shapes each request type used."""
    return {"model_dtype": self.loaded.cfg.dtype, "max_length": self.max_length,
            "compiled_shapes": {k: sorted(v) for k, v in self.shapes.items()}}

  def _record(self, kind: str, n_requests: int, before: set, used: set) -> None:
    self.shapes.setdefault(kind, set()).update(used)
    log.info("%s %s: %d requests in %d (batch, length) shapes %s, %d newly compiled", NAME, kind,
             n_requests, len(used), sorted(used), len(used - before))

  def _score(self, kind: str, rows: list, n_requests: int):
    before = set(self.scorer.shapes)
    out = self.scorer.score(rows)
    self._record(kind, n_requests, before, self.scorer.last)
    return out

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    """Instance.args (context, continuation) -> (log p(continuation | context), is greedy)."""
    rows = [pair_row(self.tok, *r.args, self.max_length) for r in requests]
    logprob, greedy = self._score("loglikelihood", rows, len(requests))
    out = [(float(lp), bool(g)) for lp, g in zip(logprob, greedy)]
    for r, o in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood", r.args, o)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Instance.args (text,) -> log p(text | prefix token), over lm-eval's windows."""
    rows, owner = [], []
    for i, r in enumerate(requests):
      windows = rolling_rows(self.tok, r.args[0], self.max_length)
      rows += windows
      owner += [i] * len(windows)
    logprob, _ = self._score("loglikelihood_rolling", rows, len(requests)) if rows else ([], [])
    totals = np.zeros(len(requests), np.float64)
    np.add.at(totals, np.asarray(owner, np.int64), np.asarray(logprob, np.float64))
    for r, t in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", r.args, float(t))
    return [float(t) for t in totals]

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Instance.args (context, gen_kwargs) -> the continuation up to its first stop sequence
    (greedy unless do_sample)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):  # one batch never mixes generation settings
      groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
    before, used, out = set(self.generator.shapes), set(), [""] * len(requests)
    eos_text = self.tok.decode([self.tok.eos_id])
    for idx in groups.values():
      kwargs = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
      until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
      prompts = [with_bos(self.tok, self.tok.encode(requests[i].args[0])).tolist() for i in idx]
      new = self.generator.generate(prompts, kwargs["max_gen_toks"], sampling_of(kwargs),
                                    self.tok.eos_id, self.seed)
      used |= self.generator.last
      for i, ids in zip(idx, new):
        text = self.tok.decode([t for t in ids.tolist() if t != self.tok.eos_id])
        out[i] = postprocess_generated_text(text, until, None)
        self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
    self._record("generate_until", len(requests), before, used)
    return out
