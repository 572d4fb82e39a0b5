"""Will a preset fit a TPU slice? Compile its sharded train step ahead of time (abstract
shapes only: nothing is allocated) and print per-device memory, all_to_all traffic and
compile time. With --topology the real TPU compiler compiles it for that slice (needs
`jax[tpu]`; Mosaic kernels included, the TPU defaults for dispatch); without, XLA:CPU
compiles it for a simulated CPU mesh of that many devices (an estimate).

  python -m experiments.plan --topology=v5p:4x4x4 --preset=deepseekmoe_16b \
      --mesh=fsdp:16,expert:4 --batch_size=64
  python -m experiments.plan --topology=v5p:4x4x4 --preset=deepseekmoe_16b --batch_size=64 --search
  python -m experiments.plan --inference --preset=deepseekmoe_16b --topology=v5e:2x4,v6e:2x4
  python -m experiments.plan --preset=deepseekmoe_145b --mesh=fsdp:32,expert:8 \
      --batch_size=256 --expert_capacity_factor=2

--inference compiles the serving programs instead (scoring, prefill, decode step; bf16
parameters; experiments/plan_inference.py). Model fields can be overridden with gin
(--gin.model_config.n_layers=4).
"""

from __future__ import annotations

import json
import math

import jax
from absl import app, flags

from experiments import common_flags, errors, gin_flags, plan_inference
from experiments.mesh_flag import mesh_flag
from moe.model.presets import model_config
from moe.parallel import compiled_cost, topology
from moe.research import plots
from moe.parallel.mesh import BATCH_AXES, MeshConfig, MeshError, make_mesh
from moe.train.config import TrainConfig
from moe.train import mesh_search
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
_SLICES = flags.DEFINE_integer("slices", 1, "--topology: this many such slices joined by the "
                               "data-centre network; data parallel across them (the mesh's data "
                               "size a multiple of it)")
_OPTIONS = flags.DEFINE_multi_string("compiler_option", [], "KEY=VALUE passed to the compiler, "
                                     "e.g. xla_tpu_enable_async_all_to_all=true (repeatable)")
_CHART = flags.DEFINE_string("chart", None, "--topology: write the estimated time by component "
                             "as a bar chart PNG here")
_SEARCH = flags.DEFINE_bool("search", False, "--topology: rank every fsdp x expert x tensor "
                            "layout of the slice by estimated step time (no --mesh)")
_FACTORS = flags.DEFINE_list("block_factors", ["1.25"], "--search: dropless block factors to try")
_TENSOR = flags.DEFINE_list("tensor_sizes", ["1", "2", "4"], "--search: tensor-parallel sizes to try")
_INFERENCE = flags.DEFINE_bool("inference", False, "compile the serving programs (lm-eval scoring, "
                               "prefill, decode step) in bf16 for each slice of --topology (a "
                               "comma-separated list) instead of the train step")
_DISPATCH = flags.DEFINE_string("dispatch", "auto", "dispatch backend (auto: the target "
                                "platform's default, pallas on TPU)")


def print_speed(s, generation: str) -> None:
  """The TPU compiler's estimate (moe.parallel.compiled_cost): a row, then where the time goes."""
  print(f"estimated by the TPU compiler's cost model, per chip (an estimate: see docs/plan.md "
        f"for its calibration); MFU against {generation}'s "
        f"{compiled_cost.PEAK_FLOPS[generation] / 1e12:.0f} TFLOP/s bf16 peak")
  print("| model TFLOP | compiled TFLOP (ratio) | step s | tokens/s | MFU | all_to_all GiB | "
        "collectives | overlapped s |")
  print("|---:|---:|---:|---:|---:|---:|---|---:|")
  collectives = ", ".join(f"{n} {k}" for k, n in s.collectives.items()) or "none"
  print(f"| {s.model_flops / 1e12:.2f} | {s.compiled_flops / 1e12:.2f} "
        f"({s.compiled_flops / s.model_flops:.2f}) | {s.step_seconds:.3f} | {s.tokens_per_sec:,.0f} | "
        f"{s.mfu:.1%} | {s.all_to_all_bytes / 2**30:.2f} | {collectives} | {s.overlapped_seconds:.3f} |")
  print("| component | estimated s | share | compiled TFLOP |")
  print("|---|---:|---:|---:|")
  for name, seconds in sorted(s.seconds.items(), key=lambda kv: -kv[1]):
    print(f"| {name} | {seconds:.4f} | {seconds / s.step_seconds:.1%} | "
          f"{s.component_flops.get(name, 0.0) / 1e12:.2f} |")
  if s.unestimated:
    print(f"not in the estimate (no cost given by the compiler): {s.unestimated}")


def print_search(cfg, slice_name: str, batch: int, seq: int) -> None:
  """--search: every layout of the slice ranked by estimated step time (moe.train.mesh_search)."""
  rows = mesh_search.search(cfg, slice_name, batch, seq, tuple(float(f) for f in _FACTORS.value),
                            tuple(int(t) for t in _TENSOR.value))
  print(f"{cfg.name} on {slice_name}, batch {batch} x {seq}: layouts ranked by the TPU compiler's "
        f"estimated step time (from {mesh_search.DEPTHS} MoE layers scaled to full depth)")
  print("| rank | mesh | block factor | step s | tokens/s/chip | MFU | exposed all_to_all s | peak GiB | fits |")
  print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
  for i, e in enumerate(rows, 1):
    print(f"| {i} | {e.mesh} | {e.block_factor} | {e.step_seconds:.3f} | {e.tokens_per_sec:,.0f} | "
          f"{e.mfu:.1%} | {e.exchange_seconds:.3f} | {plan_inference.gib(e.peak_bytes)} | {'yes' if e.fits else 'no'} |",
          flush=True)


def main(argv):
  gin_flags.parse(argv)
  if _INFERENCE.value:
    if not _TOPOLOGY.value:
      raise app.UsageError("--inference needs --topology (e.g. v5e:2x4,v6e:2x4,v5p:2x2x1)")
    jax.config.update("jax_platforms", "cpu")
    plan_inference.main(model_config(), _TOPOLOGY.value, mesh_flag(), _BATCH.value, _SEQ.value,
                        _JSON.value)
    return
  if _SEARCH.value:
    if not _TOPOLOGY.value or not _BATCH.value:
      raise app.UsageError("--search needs --topology and --batch_size")
    jax.config.update("jax_platforms", "cpu")
    cfg = model_config().replace(remat=_REMAT.value, dtype=_DTYPE.value or "bfloat16",
                                 dispatch_backend=_DISPATCH.value)
    print_search(cfg, _TOPOLOGY.value, _BATCH.value, _SEQ.value or cfg.max_seq_len)
    return
  if not mesh_flag():
    raise app.UsageError("--mesh: give the layout, e.g. fsdp:16,expert:4 (every size: they set "
                         "the device count)")
  sizes = [part.split(":")[-1] for part in mesh_flag().split(",")]
  if any(s.strip() == "-1" for s in sizes):
    raise MeshError("--mesh: give every axis size (no -1): the size sets the simulated device count")
  n_devices = math.prod(int(s) for s in sizes)
  jax.config.update("jax_platforms", "cpu")  # the host runs on CPU (no libtpu probing)
  if _TOPOLOGY.value:
    devices = topology.tpu_devices(_TOPOLOGY.value, slices=_SLICES.value)
    generation = topology.parse(_TOPOLOGY.value)[0]
    chips = {generation: topology.HBM_GIB[generation]}
  else:
    # Simulated devices must be requested before JAX starts its CPU backend (importing JAX
    # does not start it).
    jax.config.update("jax_num_cpu_devices", n_devices)
    if len(jax.devices()) != n_devices:
      raise MeshError(f"JAX already started with {len(jax.devices())} devices; run the plan in a "
                      f"fresh process (and without --xla_force_host_platform_device_count)")
    devices, chips, generation = None, topology.HBM_GIB, None

  mesh = make_mesh(MeshConfig(mesh_flag()), devices)
  cfg = model_config().replace(
      remat=_REMAT.value, dtype=_DTYPE.value or "bfloat16", expert_capacity_factor=_CF.value,
      expert_block_factor=_BLOCK.value,
      dispatch_backend=_DISPATCH.value)
  batch = _BATCH.value or math.prod(mesh.shape[a] for a in BATCH_AXES)
  seq = _SEQ.value or cfg.max_seq_len
  options = dict(o.split("=", 1) for o in _OPTIONS.value)
  p = plan(cfg, TrainConfig(), mesh, batch, seq, generation=generation if _TOPOLOGY.value else None,
           compiler_options=options or None)

  fits = ", ".join(f"{chip}: {'yes' if p.peak_bytes <= gib * 2**30 else 'no'}"
                   for chip, gib in chips.items())
  compiler = f"the TPU compiler for {_TOPOLOGY.value}" if _TOPOLOGY.value else "XLA:CPU"
  print(f"{cfg.name} on {n_devices} devices, mesh {dict(mesh.shape)}, batch {batch} x {seq} "
        f"({p.tokens_per_device} tokens/device), dtype {cfg.dtype}, remat {cfg.remat}, "
        f"expert_capacity_factor {cfg.expert_capacity_factor}")
  print("| params GiB | optimizer GiB | temporaries GiB | peak GiB | all_to_all GiB/step | "
        "+ per extra round | compile s | fits |")
  print("|---:|---:|---:|---:|---:|---:|---:|---|")
  print(f"| {plan_inference.gib(p.param_bytes)} | {plan_inference.gib(p.optimizer_bytes)} | {plan_inference.gib(p.temp_bytes)} | "
        f"{plan_inference.gib(p.peak_bytes)} | {plan_inference.gib(p.all_to_all_bytes)} | {plan_inference.gib(p.extra_round_bytes)} | "
        f"{p.compile_seconds:.1f} | {fits} |")
  if _SLICES.value > 1:
    print(f"across slices (data-centre network): {plan_inference.gib(p.cross_slice_bytes)} GiB/step per chip sent")
  print(f"(per device; temporaries from {compiler}'s memory analysis of the compiled step; "
        f"dispatch {cfg.dispatch_backend})")
  if p.speed:
    print_speed(p.speed, generation)
    if _CHART.value:
      plots.bar_chart(_CHART.value, p.speed.seconds, f"{cfg.name} on {_TOPOLOGY.value}: estimated "
                      f"seconds per step", "estimated seconds")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      f.write(json.dumps(dict(preset=cfg.name, mesh=mesh_flag(), batch=batch, seq_len=seq,
                              topology=_TOPOLOGY.value, dispatch=cfg.dispatch_backend,
                              expert_capacity_factor=cfg.expert_capacity_factor,
                              **p._asdict())) + "\n")


if __name__ == "__main__":
  errors.run(main, flags_parser=gin_flags.flags_parser)
