"""Will a preset fit a TPU slice? Compile its sharded train step ahead of time (abstract
shapes only: nothing is allocated) and print per-device memory, all_to_all traffic and
compile time. With --topology the real TPU compiler compiles it for that slice (needs
`jax[tpu]`; Mosaic kernels included, the TPU defaults for dispatch); without, XLA:CPU
compiles it for a simulated CPU mesh of that many devices (an estimate).

  python -m experiments.plan --topology=v5p:4x4x4 --preset=deepseekmoe_16b \
      --mesh=fsdp:16,expert:4 --batch_size=64
  python -m experiments.plan --preset=deepseekmoe_145b --mesh=fsdp:32,expert:8 \
      --batch_size=256 --expert_capacity_factor=2

Model fields can be overridden with gin (--gin.model_config.n_layers=4).
"""

from __future__ import annotations

import json
import math

import jax
from absl import app, flags

from experiments import common_flags, errors, gin_flags
from experiments.mesh_flag import mesh_flag
from moe.model.presets import model_config
from moe.parallel import topology
from moe.parallel.mesh import BATCH_AXES, MeshConfig, MeshError, make_mesh
from moe.train.config import TrainConfig
from moe.train.plan import plan

_PRESET = common_flags.preset()
_BATCH = common_flags.batch_size()
_SEQ = common_flags.seq_len()
_REMAT = flags.DEFINE_bool("remat", True, "rematerialise each layer in the backward pass")
_DTYPE = common_flags.dtype()  # activations; parameters stay float32
_CF = flags.DEFINE_float("expert_capacity_factor", 0.0,
                         "> 0: one all_to_all of blocks of this multiple of the balanced "
                         "share, dropping overflow; 0 = dropless rounds")
_BLOCK = flags.DEFINE_float("expert_block_factor", 1.25, "dropless rounds: block size as a "
                            "multiple of the balanced share")
_JSON = common_flags.json_out()
_TOPOLOGY = flags.DEFINE_string("topology", None, "compile for this TPU slice with the TPU "
                                "compiler, e.g. v5p:4x4x4, v4:4x4x4, v5e:4x4, v6e:4x4 (chips "
                                "must equal the mesh's device count)")
_DISPATCH = flags.DEFINE_string("dispatch", "auto", "dispatch backend (auto: the target "
                                "platform's default, pallas on TPU)")


def _gib(n: int) -> str:
  return f"{n / 2**30:.2f}"


def main(argv):
  gin_flags.parse(argv)
  if not mesh_flag():
    raise app.UsageError("--mesh: give the layout, e.g. fsdp:16,expert:4 (every size: they set "
                         "the device count)")
  sizes = [part.split(":")[-1] for part in mesh_flag().split(",")]
  if any(s.strip() == "-1" for s in sizes):
    raise MeshError("--mesh: give every axis size (no -1): the size sets the simulated device count")
  n_devices = math.prod(int(s) for s in sizes)
  jax.config.update("jax_platforms", "cpu")  # the host runs on CPU (no libtpu probing)
  if _TOPOLOGY.value:
    devices = topology.tpu_devices(_TOPOLOGY.value)
    generation = topology.parse(_TOPOLOGY.value)[0]
    chips = {generation: topology.HBM_GIB[generation]}
  else:
    # Simulated devices must be requested before JAX starts its CPU backend (importing JAX
    # does not start it).
    jax.config.update("jax_num_cpu_devices", n_devices)
    if len(jax.devices()) != n_devices:
      raise MeshError(f"JAX already started with {len(jax.devices())} devices; run the plan in a "
                      f"fresh process (and without --xla_force_host_platform_device_count)")
    devices, chips = None, topology.HBM_GIB

  mesh = make_mesh(MeshConfig(mesh_flag()), devices)
  cfg = model_config().replace(
      remat=_REMAT.value, dtype=_DTYPE.value or "bfloat16", expert_capacity_factor=_CF.value,
      expert_block_factor=_BLOCK.value,
      dispatch_backend=_DISPATCH.value)
  batch = _BATCH.value or math.prod(mesh.shape[a] for a in BATCH_AXES)
  seq = _SEQ.value or cfg.max_seq_len
  p = plan(cfg, TrainConfig(), mesh, batch, seq)

  fits = ", ".join(f"{chip}: {'yes' if p.peak_bytes <= gib * 2**30 else 'no'}"
                   for chip, gib in chips.items())
  compiler = f"the TPU compiler for {_TOPOLOGY.value}" if _TOPOLOGY.value else "XLA:CPU"
  print(f"{cfg.name} on {n_devices} devices, mesh {dict(mesh.shape)}, batch {batch} x {seq} "
        f"({p.tokens_per_device} tokens/device), dtype {cfg.dtype}, remat {cfg.remat}, "
        f"expert_capacity_factor {cfg.expert_capacity_factor}")
  print("| params GiB | optimizer GiB | temporaries GiB | peak GiB | all_to_all GiB/step | "
        "+ per extra round | compile s | fits |")
  print("|---:|---:|---:|---:|---:|---:|---:|---|")
  print(f"| {_gib(p.param_bytes)} | {_gib(p.optimizer_bytes)} | {_gib(p.temp_bytes)} | "
        f"{_gib(p.peak_bytes)} | {_gib(p.all_to_all_bytes)} | {_gib(p.extra_round_bytes)} | "
        f"{p.compile_seconds:.1f} | {fits} |")
  print(f"(per device; temporaries from {compiler}'s memory analysis of the compiled step; "
        f"dispatch {cfg.dispatch_backend})")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      f.write(json.dumps(dict(preset=cfg.name, mesh=mesh_flag(), batch=batch, seq_len=seq,
                              topology=_TOPOLOGY.value, dispatch=cfg.dispatch_backend,
                              expert_capacity_factor=cfg.expert_capacity_factor,
                              **p._asdict())) + "\n")


if __name__ == "__main__":
  errors.run(main, flags_parser=gin_flags.flags_parser)
