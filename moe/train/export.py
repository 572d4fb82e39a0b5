"""A training run's checkpoint exported in the released format: the parameters
(moe.hub.safetensors_export: sharded safetensors, index, config.json) and the run's
tokenizer (data.text_tokenizer.write_tokenizer_files: tokenizer.model and, converted,
tokenizer.json), so that moe.hub's importer, transformers-style tools and
`experiments.eval --hf_checkpoint` read it like a released checkpoint."""

from __future__ import annotations

import os
from typing import NamedTuple

from jax.sharding import Mesh

from data.input_pipeline import trained_tokenizer_path
from data.text_tokenizer import load_tokenizer, write_tokenizer_files
from moe.hub.hf_config import config_to_hf
from moe.hub.safetensors_export import export_checkpoint
from moe.train.restore import restore_run


class Exported(NamedTuple):
  step: int
  files: list[str]
  notes: list[str]  # what could not be written, and why


def export_run(workdir: str, out_dir: str, step: int | None = None, dtype: str = "bfloat16",
               max_shard_bytes: int = 4 << 30, mesh: Mesh | None = None) -> Exported:
  """Export workdir's checkpoint (default: the latest) to out_dir (new or empty). `mesh`:
  where the parameters are restored (one device by default); they are written from one
  host, a layer at a time."""
  run = restore_run(workdir, step, mesh)
  config_to_hf(run.model_cfg, dtype, None, None)  # refuse what the format cannot hold, first
  tok_path = run.data_cfg.tokenizer_path or trained_tokenizer_path(run.data_cfg)
  if not os.path.exists(os.path.expanduser(tok_path)):
    raise FileNotFoundError(f"the run's tokenizer {tok_path!r} is gone; set DataConfig.tokenizer_path "
                            f"in {workdir}/run_config.json's data or re-create it")
  tok = load_tokenizer(tok_path)
  files = export_checkpoint(out_dir, run.model_cfg, run.params, dtype, max_shard_bytes,
                            bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
  written, notes = write_tokenizer_files(tok, out_dir, run.model_cfg.max_seq_len)
  return Exported(run.step, files + written, notes)
