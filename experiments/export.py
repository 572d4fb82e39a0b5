"""Export a training run's checkpoint in the released DeepSeek-MoE format (safetensors
shards, index, config.json, tokenizer), readable by `experiments.eval --hf_checkpoint`,
`TrainConfig.init_from_hf` and transformers-style loaders.

  python -m experiments.export --workdir=workdirs/tiny_deepseekmoe --out_dir=/tmp/tiny_hf
  python -m experiments.export --workdir=RUN --out_dir=DIR --step=200 --dtype=float32 --max_shard_mb=2048
  python -m experiments.export --workdir=RUN --out_dir=DIR --mesh=fsdp:8   # restored in shards
"""

from __future__ import annotations

from absl import app, flags, logging

from experiments import common_flags, errors
from experiments.mesh_flag import mesh_config
from moe.parallel.mesh import make_mesh
from moe.train.export import export_run

_WORKDIR = common_flags.workdir(required=True)
_OUT = common_flags.out_dir()
_STEP = common_flags.step()
_DTYPE = common_flags.dtype()
_MAX_SHARD_MB = flags.DEFINE_float("max_shard_mb", 4096, "largest shard file, in MiB")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _OUT.value:
    raise app.UsageError("--out_dir: give the new checkpoint directory (new or empty)")
  dtype = _DTYPE.value or "bfloat16"  # as released
  logging.set_verbosity(logging.WARNING)
  mesh_cfg = mesh_config()
  out = export_run(_WORKDIR.value, _OUT.value, _STEP.value, dtype,
                   int(_MAX_SHARD_MB.value * (1 << 20)), make_mesh(mesh_cfg) if mesh_cfg.shape else None)
  print(f"step {out.step} -> {_OUT.value} ({dtype}): {', '.join(out.files)}")
  for note in out.notes:
    print(f"note: {note}")


if __name__ == "__main__":
  errors.run(main)
