"""Evaluate a checkpoint: validation loss, perplexity and per-layer routing statistics.

  python -m experiments.eval --workdir=workdirs/tiny_deepseekmoe [--step=200]
  python -m experiments.eval --workdir=... --gin.DataConfig.eval_batches=64
  python -m experiments.eval --workdir=... --mesh=fsdp:4,expert:2   # parameters in shards
  python -m experiments.eval --workdir=... --distributed --mesh=data:-1 --json_out=eval.json
  python -m experiments.eval --hf_checkpoint=DIR --text_file=F.txt [--seq_len=1024]
  python -m experiments.eval --hf_checkpoint=DIR --choices_file=F.jsonl [--dtype=float32]

The run's own model and data configs are used; DataConfig bindings override the data
config's fields, `--mesh` (or MeshConfig.shape) restores the parameters in their shards
onto a mesh and evaluates there, and bindings of anything else are refused. With
`--distributed` every host of a multi-host job runs this command: each reads its own shard
of the held-out split, and the mesh spans all hosts.
`--text_file` (perplexity in windows of seq_len) and `--choices_file` (one JSON object per
line: context, choices, answer) score a released-format checkpoint directory
(`--hf_checkpoint`, with its tokenizer) or a run (`--workdir`, with the run's tokenizer);
moe.train.lm_eval has the scoring.
"""

from __future__ import annotations

import json
import os

import gin
import jax
import numpy as np
from absl import app, flags, logging

from data.config import DataConfig
from data.input_pipeline import tokenizer_for
from data.text_tokenizer import load_tokenizer
from experiments import common_flags, errors, gin_flags
from experiments.mesh_flag import mesh_config
from moe.cache import enable_compile_cache
from moe.hub.safetensors_import import import_checkpoint
from moe.model.presets import model_config
from moe.parallel.hosts import initialize_distributed
from moe.parallel.mesh import make_mesh
from moe.train import lm_eval
from moe.train.config import TrainConfig
from moe.train.evaluate import evaluate_checkpoint
from moe.train.metrics import tensorboard_scalars
from moe.train.restore import restore_run

_WORKDIR = common_flags.workdir()
_STEP = common_flags.step()
_HF = common_flags.hf_checkpoint()
_TEXT = flags.DEFINE_string("text_file", None, "report perplexity over this text file")
_CHOICES = flags.DEFINE_string("choices_file", None, "score these multiple-choice items "
                               "(JSON lines: context, choices, answer)")
_SEQ_LEN = common_flags.seq_len()  # --text_file / --choices_file windows
_BATCH = common_flags.batch_size()
_DISTRIBUTED = common_flags.distributed()
_JSON_OUT = common_flags.json_out()  # beside WORKDIR/eval/step_N.json, always written
_DTYPE = common_flags.dtype()  # --hf_checkpoint's parameters and compute


def format_report(out: dict) -> str:
  lines = [f"step {out['step']}: validation loss {out['eval_loss']:.4f} nats/token, "
           f"perplexity {out['eval_perplexity']:.2f} (unigram entropy {out['unigram_entropy']:.4f})"]
  return "\n".join(lines + format_layers(out["layers"]))


def format_layers(layers: dict) -> list[str]:
  """The per-MoE-layer routing statistics as a table, then each layer's expert load."""
  lines = []
  if layers:
    lines.append("layer  max/mean load  router entropy  dropped  expert balance")
    for i in range(len(layers["max_over_mean_load"])):
      lines.append(f"{i:5d}  {layers['max_over_mean_load'][i]:13.3f}  {layers['router_entropy'][i]:14.3f}"
                   f"  {layers['dropped_fraction'][i]:7.3f}  {layers['expert_balance_loss'][i]:14.4f}")
    lines.append("expert load (fraction of assignments), one row per MoE layer:")
    lines.extend("  " + " ".join(f"{x:.3f}" for x in np.asarray(row)) for row in layers["load"])
  return lines


def format_lm_report(what: str, ppl: dict | None, mc: dict | None) -> str:
  lines = [what]
  if ppl:
    lines.append(f"perplexity {ppl['perplexity']:.3f}: {ppl['nll']:.4f} nats/token over {ppl['tokens']} "
                 f"tokens in {ppl['windows']} windows ({ppl['bits_per_byte']:.4f} bits/byte)")
    lines.extend(format_layers(ppl["layers"]))
  if mc:
    lines.append(f"multiple choice: {mc['items']} items, accuracy {mc['accuracy']:.4f}, "
                 f"accuracy_norm {mc['accuracy_norm']:.4f} (log-likelihood per character)")
  return "\n".join(lines)


def lm_report(mesh_cfg) -> str:
  """--text_file / --choices_file on --hf_checkpoint or --workdir."""
  mesh = make_mesh(mesh_cfg) if mesh_cfg.shape else None
  if _HF.value:
    dtype = _DTYPE.value or "bfloat16"
    ckpt = import_checkpoint(_HF.value, mesh, dtype=dtype)
    lm, tok = lm_eval.LM(ckpt.graphdef, ckpt.params, mesh), load_tokenizer(_HF.value)
    seq_len, what = _SEQ_LEN.value or ckpt.model_cfg.max_seq_len, f"{_HF.value} ({dtype})"
  else:
    run = restore_run(_WORKDIR.value, _STEP.value, mesh)
    lm, tok = lm_eval.LM(run.graphdef, run.params, mesh), tokenizer_for(run.data_cfg)
    seq_len, what = _SEQ_LEN.value or run.data_cfg.seq_len, f"{_WORKDIR.value} step {run.step}"
  ppl = mc = None
  if _TEXT.value:
    with open(_TEXT.value) as f:
      ppl = lm_eval.perplexity(lm, tok, f.read(), seq_len, _BATCH.value)
  if _CHOICES.value:
    with open(_CHOICES.value) as f:
      items = [json.loads(line) for line in f if line.strip()]
    mc = lm_eval.multiple_choice(lm, tok, items, seq_len, _BATCH.value)
  return format_lm_report(f"{what}, seq_len {seq_len}", ppl, mc)


def write_json(path: str, out: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  record = {k: v for k, v in out.items() if k != "layers"}
  record["layers"] = {k: np.asarray(v).tolist() for k, v in out["layers"].items()}
  with open(path, "w") as f:
    json.dump(record, f, indent=1)


def main(argv):
  if _DISTRIBUTED.value:
    initialize_distributed()
  gin_flags.parse(argv)
  if bool(_WORKDIR.value) == bool(_HF.value):
    raise app.UsageError("pass one of --workdir (a training run) or --hf_checkpoint (a directory)")
  if _HF.value and not (_TEXT.value or _CHOICES.value):
    raise app.UsageError("--hf_checkpoint needs --text_file and/or --choices_file")
  fixed = {c.__name__: sorted(gin.get_bindings(c)) for c in (model_config, TrainConfig)
           if gin.get_bindings(c)}
  if fixed:
    raise app.UsageError(f"gin bindings {fixed} do not apply: a checkpoint is evaluated with its run's "
                         f"own model; only DataConfig (and MeshConfig, or --mesh) may be set")
  logging.set_verbosity(logging.WARNING)
  enable_compile_cache()
  overrides = gin.get_bindings(DataConfig)
  if overrides:
    print(f"DataConfig overrides on top of the run's: {overrides}")
  mesh_cfg = mesh_config()
  if mesh_cfg.shape:
    print(f"mesh: {mesh_cfg.shape}")
  if _TEXT.value or _CHOICES.value:
    print(lm_report(mesh_cfg))
    return
  out = evaluate_checkpoint(_WORKDIR.value, _STEP.value, overrides, mesh_cfg)
  print(format_report(out))
  if jax.process_index() == 0:  # into the run's directory, beside its training records
    path = os.path.join(_WORKDIR.value, "eval", f"step_{out['step']}.json")
    for p in [path] + ([_JSON_OUT.value] if _JSON_OUT.value else []):
      write_json(p, dict(out, data_overrides=overrides))
    scalars = {"eval_loss": out["eval_loss"], "eval_perplexity": out["eval_perplexity"]}
    if not overrides:  # the run's own evaluation set: comparable with its training curves
      tensorboard_scalars(os.path.join(_WORKDIR.value, "tensorboard", "eval"), out["step"], scalars)
    print(f"written: {path}")


if __name__ == "__main__":
  errors.run(main, flags_parser=gin_flags.flags_parser)
