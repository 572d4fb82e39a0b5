"""The paper's specialization analyses over trained runs: tables and PNG plots.

  python -m experiments.analyze --workdir=/work/sweeps/cpu/deepseekmoe \
      --workdir=/work/sweeps/cpu/gshard_x1.5 --out_dir=/tmp/analysis
  python -m experiments.analyze --workdir=... --mesh=fsdp:4,expert:2   # parameters in shards

Writes OUT_DIR/analysis.md, analysis.json and plots: redundancy.png (paper Fig. 4),
activated_experts.png (Fig. 5), load_<run>.png, categories_<run>.png.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

from experiments import common_flags, errors
from experiments.mesh_flag import mesh_config
from moe.cache import enable_compile_cache
from moe.research import report

_WORKDIRS = common_flags.workdir(required=True, multiple=True)
_OUT = common_flags.out_dir()
_STEP = common_flags.step()
_ANALYSES = flags.DEFINE_list("analyses", list(report.ANALYSES), "which analyses")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 20_000, "held-out tokens for the category analysis")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  enable_compile_cache()
  names = [os.path.basename(os.path.normpath(w)) for w in _WORKDIRS.value]
  if len(set(names)) != len(names):
    names = [f"{i}_{n}" for i, n in enumerate(names)]
  out_dir = _OUT.value or os.path.join(_WORKDIRS.value[0], "analysis")
  results = report.analyze(dict(zip(names, _WORKDIRS.value)), out_dir, _ANALYSES.value,
                           _MAX_TOKENS.value, _STEP.value, mesh_cfg=mesh_config())
  text = report.report(results)
  with open(os.path.join(out_dir, "analysis.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(out_dir, "analysis.json"), "w") as f:
    json.dump(results, f)
  print(text)
  print(f"written to {out_dir}")


if __name__ == "__main__":
  errors.run(main)
