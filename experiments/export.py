"""Export a training run's checkpoint in the released DeepSeek-MoE format (safetensors
shards, index, config.json, tokenizer), readable by `experiments.eval --hf_checkpoint`,
`TrainConfig.init_from_hf` and transformers-style loaders.

  python -m experiments.export --workdir=workdirs/tiny_deepseekmoe --out=/tmp/tiny_hf
  python -m experiments.export --workdir=RUN --out=DIR --step=200 --dtype=float32 --max_shard_mb=2048
  python -m experiments.export --workdir=RUN --out=DIR --mesh=fsdp:8   # restored in shards
"""

from __future__ import annotations

from absl import app, flags, logging

from experiments import errors
from experiments.mesh_flag import mesh_config
from moe.parallel.mesh import make_mesh
from moe.train.export import export_run

_WORKDIR = flags.DEFINE_string("workdir", None, "a training run's directory", required=True)
_OUT = flags.DEFINE_string("out", None, "the new checkpoint directory (new or empty)", required=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "the tensors' dtype")
_MAX_SHARD_MB = flags.DEFINE_float("max_shard_mb", 4096, "largest shard file, in MiB")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  mesh_cfg = mesh_config()
  out = export_run(_WORKDIR.value, _OUT.value, _STEP.value, _DTYPE.value,
                   int(_MAX_SHARD_MB.value * (1 << 20)), make_mesh(mesh_cfg) if mesh_cfg.shape else None)
  print(f"step {out.step} -> {_OUT.value} ({_DTYPE.value}): {', '.join(out.files)}")
  for note in out.notes:
    print(f"note: {note}")


if __name__ == "__main__":
  errors.run(main)
