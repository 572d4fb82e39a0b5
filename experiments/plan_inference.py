"""`python -m experiments.plan --inference`: the serving programs of a preset (lm-eval
scoring, prefill, the decode step; moe.train.inference_plan) compiled by the TPU compiler
for each slice of --topology (a comma-separated list), bf16 parameters, abstract shapes
only; a markdown table per chip: memory, the batch that fits, estimated time per call.

  python -m experiments.plan --inference --preset=deepseekmoe_16b \
      --topology=v5e:2x4,v6e:2x4,v5p:2x2x1 --json_out=/tmp/inference.jsonl
  python -m experiments.plan --inference --preset=deepseekmoe_16b --topology=v5e:2x4 \
      --batch_size=64 --mesh=expert:4,tensor:2    # one batch, another layout

Without --batch_size each slice searches the largest batch whose programs fit its HBM
(moe.train.inference_plan.largest_batch: compiled at the smallest batch, twice it, then the
extrapolated batch), for generation (prefill + decode step share the cache's batch) and for
scoring apart.
"""

from __future__ import annotations

import json
import math
import time

from absl import flags

from moe.parallel import compiled_cost, topology
from moe.train import inference_plan as ip

_MAX_LEN = flags.DEFINE_integer("max_len", None, "--inference: KV cache positions per row "
                                "(default the model's max_seq_len)", lower_bound=1)
_CHUNK = flags.DEFINE_integer("prefill_chunk", ip.PREFILL_CHUNK, "--inference: prompt tokens "
                              "per prefill call (moe.decode.Decoder's default)", lower_bound=1)

HEADER = ("| slice | mesh | program | batch | params GiB | KV cache GiB | temporaries GiB | "
          "peak GiB / HBM | est. ms per call | cost_analysis ms | HBM-bound ms | compile s |")


def gib(n: float) -> str:
  return f"{n / 2**30:.2f}"


def row(slice_name: str, mesh: str, p: ip.Program, hbm_gib: int) -> str:
  bound = f"{p.hbm_bound_seconds * 1e3:.2f}" if p.hbm_bound_seconds else "-"
  return (f"| {slice_name} | {mesh} | {p.name} ({p.tokens} tok/row) | {p.batch} | {gib(p.param_bytes)} | "
          f"{gib(p.cache_bytes)} | {gib(p.temp_bytes)} | {gib(p.peak_bytes)} / {hbm_gib} | "
          f"{p.estimated_seconds * 1e3:.2f} | {p.optimal_seconds * 1e3:.2f} | {bound} | "
          f"{p.compile_seconds:.0f} |")


def plan_slice(cfg, slice_name: str, mesh_spec: str | None, batch: int | None, seq_len: int,
               json_out: str | None) -> None:
  generation, _ = topology.parse(slice_name)
  mesh = ip.slice_mesh(cfg, slice_name, mesh_spec)
  spec = ",".join(f"{a}:{n}" for a, n in mesh.shape.items() if n > 1) or "one chip"
  hbm = topology.HBM_GIB[generation]
  unit = ip.batch_unit(mesh)
  kw = dict(seq_len=seq_len, max_len=_MAX_LEN.value, chunk=_CHUNK.value)
  start = time.perf_counter()
  searches = {"generation": ("prefill", "decode_step"), "scoring": ("score",)}
  fits, rows = {}, []
  for what, which in searches.items():
    at = lambda b: ip.compile_programs(cfg, mesh, generation, b, which=which, **kw)
    if batch:
      fits[what] = ip.Fit(batch, {batch: at(batch)}, hbm * 2**30)
    else:
      fits[what] = ip.largest_batch(at, unit, hbm * 2**30)
    for b, got in sorted(fits[what].compiled.items()):
      if isinstance(got, str):
        rows.append(f"| {slice_name} | {spec} | {'/'.join(which)} | {b} | {got} |")
        continue
      rows += [row(slice_name, spec, p, hbm) + (" **fits (largest found)**" if b == fits[what].batch else "")
               for p in got]
      if json_out:
        with open(json_out, "a") as f:
          for p in got:
            f.write(json.dumps(dict(preset=cfg.name, slice=slice_name, mesh=spec,
                                    largest=b == fits[what].batch, **p._asdict())) + "\n")
  print(f"\n{cfg.name} on {slice_name} ({math.prod(mesh.shape.values())} chips, {hbm} GiB HBM "
        f"each), mesh {spec}, bf16 parameters; per chip; times are the TPU compiler's estimates "
        f"(compiled_cost; cost_analysis counts loop bodies once); HBM bound at "
        f"{compiled_cost.HBM_BYTES_PER_S[generation] / 1e9:.0f} GB/s")
  print(HEADER)
  print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  print("\n".join(rows))
  for what, fit in fits.items():
    print(f"{what}: largest batch that compiles and fits: {fit.batch or 'none (not even ' + str(unit) + ')'}"
          + (" (the search's cap)" if fit.batch >= ip.MAX_BATCH else ""))
    if fit.limit < hbm * 2**30:
      print(f"  (the compiler refused a larger one, naming {gib(fit.limit)} GiB of HBM per chip)")
  gen = fits["generation"]
  if gen.batch:
    pre, step = gen.compiled[gen.batch]
    calls = -(-seq_len // pre.tokens)
    print(f"prefill of a {seq_len}-token prompt: {calls} calls x {pre.estimated_seconds * 1e3:.2f} ms "
          f"= {calls * pre.estimated_seconds:.3f} s (estimated); decode step: "
          f"{step.estimated_seconds * 1e3:.2f} ms for {gen.batch} rows, "
          f"{gen.batch / step.estimated_seconds:,.0f} tokens/s on the slice (estimated)")
    print(f"decode step's MoE: {ip.decode_dispatch(mesh)}; routed-expert weights read per chip "
          f"per step (uniform routing): {gib(step.expert_read_bytes)} GiB; Mosaic kernels: "
          f"{step.kernels or 'none'}; collectives: {step.collectives}")
    print(f"prefill's MoE kernels: {pre.kernels}; seconds by component (decode step): "
          + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in sorted(step.seconds.items(), key=lambda kv: -kv[1])))
  print(f"({slice_name}: {time.perf_counter() - start:.0f} s in all)", flush=True)


def main(cfg, topologies: str, mesh_spec: str | None, batch: int | None, seq_len: int | None,
         json_out: str | None) -> None:
  if json_out:
    open(json_out, "w").close()
  for name in (t.strip() for t in topologies.split(",") if t.strip()):
    plan_slice(cfg, name, mesh_spec, batch, seq_len or 2048, json_out)
