"""Train a DeepSeekMoE LM. With no flags: the tiny preset on the embedded stdlib corpus.

  python -m experiments.train
  python -m experiments.train --workdir=/tmp/run --gin_file=experiments/configs/x.gin \
      --preset=deepseekmoe_2b --gin.TrainConfig.steps=1000
  python -m experiments.train --mesh=fsdp:2,expert:4     # 8 devices, experts split 4 ways
  python -m experiments.train --profile_steps=10:12      # jax.profiler trace of steps 10-12
"""

from __future__ import annotations

import os

import jax
from absl import app, flags, logging

from experiments import common_flags, errors, gin_flags
from experiments.generation import load_run, sample_continuation
from experiments.mesh_flag import mesh_config
from moe.cache import enable_compile_cache
from moe.decode.sampling import Sampling
from moe.model.presets import model_config
from moe.parallel.hosts import initialize_distributed
from moe.parallel.mesh import make_mesh
from moe.train.loop import train_and_evaluate
from moe.train.profile import parse_steps

_WORKDIR = common_flags.workdir()
_PRESET = common_flags.preset()
_STOP_AFTER = flags.DEFINE_integer("stop_after_steps", None,
                                   "checkpoint and exit after this many steps; rerun to resume")
_PROFILE = flags.DEFINE_string("profile_steps", None, "FIRST:LAST: trace these steps with "
                               "jax.profiler into WORKDIR/profile (TensorBoard / Perfetto)")
_SAMPLE = common_flags.max_new_tokens()  # a finished run prints a greedy and a sampled continuation
_DISTRIBUTED = common_flags.distributed()


def main(argv):
  if _DISTRIBUTED.value:
    initialize_distributed()
  gin_flags.parse(argv)
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  enable_compile_cache()
  model_cfg = model_config()
  mesh_cfg = mesh_config()
  if not mesh_cfg.shape and jax.device_count() > 1 and jax.default_backend() != "cpu":
    logging.warning("using 1 of %d devices: pass --mesh=data:-1 (or another layout) to use all",
                    jax.device_count())
  workdir = _WORKDIR.value or os.path.join("workdirs", model_cfg.name)
  try:
    profile_steps = parse_steps(_PROFILE.value) if _PROFILE.value else None
  except ValueError as e:
    raise app.UsageError(f"--profile_steps: {e}") from None
  print(f"workdir: {os.path.abspath(workdir)}  model: {model_cfg.name}  mesh: {mesh_cfg.shape or 'one device'}",
        flush=True)
  result = train_and_evaluate(workdir, model_cfg, stop_after_steps=_STOP_AFTER.value,
                              mesh_cfg=mesh_cfg, profile_steps=profile_steps)
  if result.status == "nothing_to_do":
    print(f"nothing to do: the run finished its {result.step} steps; raise "
          f"--gin.TrainConfig.steps to continue it")
  else:
    print(f"{result.status} at step {result.step}: train loss {result.train_loss:.4f}")
  if result.eval:
    print(f"validation loss {result.eval['eval_loss']:.4f} nats/token "
          f"(perplexity {result.eval['eval_perplexity']:.1f}); "
          f"unigram entropy of the training tokens {result.unigram_entropy:.4f} nats/token")
  if result.status in ("finished", "nothing_to_do") and _SAMPLE.value > 0:
    print_sample(workdir, _SAMPLE.value, mesh_cfg)


def print_sample(workdir: str, n_tokens: int, mesh_cfg) -> None:
  """The trained model's greedy and sampled continuations of a held-out prompt (KV-cache
  decoding)."""
  if jax.process_count() > 1:  # the decoder takes host arrays: one process only
    print("(no sample: generation runs in single-process jobs)")
    return
  loaded = load_run(workdir, mesh=make_mesh(mesh_cfg))
  greedy = sample_continuation(workdir, n_tokens, loaded=loaded)
  sampled = sample_continuation(workdir, n_tokens, sampling=Sampling(temperature=1.0), seed=0,
                                loaded=loaded)
  print(f"a held-out prompt and two {n_tokens}-token continuations:\n"
        f"--- prompt ---\n{greedy['prompts'][0]}\n"
        f"--- greedy ---\n{greedy['texts'][0]}\n"
        f"--- sampled at temperature 1, seed 0 ---\n{sampled['texts'][0]}")


if __name__ == "__main__":
  errors.run(main, flags_parser=gin_flags.flags_parser)
