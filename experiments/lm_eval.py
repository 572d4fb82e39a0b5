"""lm-evaluation-harness's command line with this codebase's model registered
(`deepseekmoe_jax`, moe.train.harness). lm-eval 0.4 looks models up only among those its own
modules register (no plugin entry points), so this imports the adapter, then runs lm-eval's
CLI on the same arguments (`run` is implied, as with `lm_eval`).

  python -m experiments.lm_eval --model deepseekmoe_jax --tasks hellaswag,piqa \
      --model_args "hf_checkpoint=DIR,dtype=bfloat16,mesh='fsdp:4,expert:2'" --batch_size 4
  python -m experiments.lm_eval --model deepseekmoe_jax --model_args workdir=RUN \
      --include_path tests/data/harness --tasks moe_harness_mc,moe_harness_ppl,moe_harness_gen

Needs the `eval` extra: pip install -e ".[eval]".
"""

from __future__ import annotations


def main() -> None:
  from experiments.accelerators import cpu_unless_accelerator
  from moe.cache import enable_compile_cache

  cpu_unless_accelerator()  # no libtpu start-up noise on machines without a TPU
  enable_compile_cache()
  try:
    from lm_eval.__main__ import cli_evaluate
  except ImportError as e:
    raise SystemExit(f"error: lm-eval is not installed ({e}); pip install -e '.[eval]'") from None
  import moe.train.harness  # noqa: F401  (registers deepseekmoe_jax)

  cli_evaluate()


if __name__ == "__main__":
  main()
