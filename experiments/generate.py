"""Generate text with a trained run or a public-format checkpoint directory (KV-cache
decoding, moe.decode); prints each continuation and the decode speed.

  python -m experiments.generate --workdir=workdirs/tiny_deepseekmoe --prompt="def main(" \
      --max_new_tokens=64                               # greedy (--temperature=0)
  python -m experiments.generate --hf_checkpoint=DIR --prompt="..." --prompt="..." \
      --temperature=0.7 --top_p=0.9 --seed=1 --json_out=out.json
  python -m experiments.generate --workdir=... --prompt=... --mesh=data:2,tensor:4

--dtype: float32 computes in f32; the default is bfloat16 for --hf_checkpoint (parameters
stored in bf16 too) and the run's own dtype for --workdir.
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from experiments import common_flags, errors, generation
from experiments.mesh_flag import mesh_config
from moe.cache import enable_compile_cache
from moe.decode.sampling import Sampling
from moe.parallel.mesh import make_mesh

_WORKDIR = common_flags.workdir()
_STEP = common_flags.step()
_HF = common_flags.hf_checkpoint()
_PROMPT = flags.DEFINE_multi_string("prompt", None, "prompt text; repeat for a batch", required=True)
_MAX_NEW = common_flags.max_new_tokens()
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "sample from the k most likely tokens (0: all)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "sample from the smallest set of mass >= p (1: all)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_DTYPE = common_flags.dtype()
_JSON = common_flags.json_out()  # prompt ids, generated ids, texts and timing


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if (_WORKDIR.value is None) == (_HF.value is None):
    raise app.UsageError("give exactly one of --workdir and --hf_checkpoint")
  if _MAX_NEW.value == 0:
    raise app.UsageError("--max_new_tokens=0: nothing to generate")
  logging.set_verbosity(logging.WARNING)
  enable_compile_cache()
  mesh = make_mesh(mesh_config())
  if _WORKDIR.value:
    loaded = generation.load_run(_WORKDIR.value, _STEP.value, mesh, _DTYPE.value)
  else:
    loaded = generation.load_hf_checkpoint(_HF.value, _DTYPE.value or "bfloat16", mesh)
  sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  out = generation.generate_text(loaded, _PROMPT.value, _MAX_NEW.value, sampling, _SEED.value)
  print(generation.format_result(out))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  errors.run(main)
