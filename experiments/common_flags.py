"""One flag per concept, shared by every script: the same name, type, default and help
wherever a concept appears. A script calls the definer for each concept it takes
(`common_flags.batch_size()`); calling one twice returns the same flag.

Old names are still accepted for a while: each prints `warning: --OLD is deprecated; use
--NEW` and sets the new flag (`apply_deprecated`, run by `errors.run` before main).
tests/test_flag_vocabulary.py imports every script and fails where one concept has two
names, or one name two definitions.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, NamedTuple

from absl import app, flags

from moe.model.config import DTYPES


class Alias(NamedTuple):
  old: str
  new: str
  convert: Callable[[str], Any]


def _ints(text: str) -> list[int]:
  return [int(part) for part in text.split(",") if part.strip()]


_DEFINED: dict[str, tuple[bool, flags.FlagHolder]] = {}
_ALIASES: dict[str, Alias] = {}
# Old names per concept, each with how its value reads; defined beside the concept's flag
# (for the deprecation path and the vocabulary test).
DEPRECATED: dict[str, dict[str, Callable[[str], Any]]] = {
    "batch_size": {"batch": int, "batches": _ints},
    "max_new_tokens": {"new_tokens": int, "sample_tokens": int},
    "out_dir": {"out": str},
    "seq_len": {"seq_lens": _ints},
    "n_routed_experts": {"experts": int},
    "n_shared_experts": {"shared": int},
}


def _once(name: str, define: Callable[[], flags.FlagHolder], multiple: bool = False) -> flags.FlagHolder:
  for old, convert in DEPRECATED.get(name, {}).items():
    _alias(old, name, convert)
  if name not in _DEFINED:
    _DEFINED[name] = multiple, define()
  if _DEFINED[name][0] != multiple:
    raise flags.Error(f"--{name} is already defined {'with' if _DEFINED[name][0] else 'without'} "
                      f"repeats; one script cannot take both")
  return _DEFINED[name][1]


def defined(name: str) -> flags.FlagHolder | None:
  """The shared flag NAME if this script defined it."""
  return _DEFINED[name][1] if name in _DEFINED else None


def _alias(old: str, new: str, convert: Callable[[str], Any]) -> None:
  if old not in _ALIASES:
    _ALIASES[old] = Alias(old, new, convert)
    # Defined under this module's name but not a key flag of the script: --help leaves it out.
    flags.DEFINE_string(old, None, f"deprecated: use --{new}", module_name=__name__ + ".deprecated")


def apply_deprecated(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Old names given on the command line set their new flag, with one warning line each."""
  for alias in _ALIASES.values():
    if alias.old not in flag_values or not flag_values[alias.old].present:
      continue
    old, new = flag_values[alias.old], flag_values[alias.new]
    if new.present:
      raise app.UsageError(f"--{alias.old} and --{alias.new} are the same flag: "
                           f"give --{alias.new} only")
    value = alias.convert(old.value)
    if isinstance(new, flags.MultiFlag):
      value = value if isinstance(value, list) else [value]
    elif isinstance(value, list):
      if len(value) != 1:
        raise app.UsageError(f"--{alias.old}={old.value}: this script takes one value")
      value = value[0]
    new.value = value
    print(f"warning: --{alias.old} is deprecated; use --{alias.new}", file=sys.stderr)


# --- what to run on -------------------------------------------------------------------------

def workdir(required: bool = False, multiple: bool = False) -> flags.FlagHolder:
  define = flags.DEFINE_multi_string if multiple else flags.DEFINE_string
  return _once("workdir", lambda: define(
      "workdir", None, "a training run's directory (train: where the run is written, default "
      "./workdirs/<model name>; sweep: the parent of the variants' directories)"
      + ("; repeatable" if multiple else ""), required=required), multiple)


def step() -> flags.FlagHolder:
  return _once("step", lambda: flags.DEFINE_integer(
      "step", None, "--workdir's checkpoint step (default: the latest)", lower_bound=0))


def hf_checkpoint() -> flags.FlagHolder:
  return _once("hf_checkpoint", lambda: flags.DEFINE_string(
      "hf_checkpoint", None, "a released-format checkpoint directory (config.json, "
      "*.safetensors, tokenizer)"))


def preset() -> flags.FlagHolder:
  """Applied through gin (experiments.gin_flags) as `model_config.preset`, so the gin files
  and bindings that train and eval take override the same model."""
  return _once("preset", lambda: flags.DEFINE_string(
      "preset", None, "model preset, e.g. tiny_deepseekmoe, deepseekmoe_16b (default: gin's "
      "model_config.preset, tiny_deepseekmoe unless a --gin_file sets it); the same as "
      "--gin.model_config.preset=\"'NAME'\""))


def distributed() -> flags.FlagHolder:
  return _once("distributed", lambda: flags.DEFINE_bool(
      "distributed", False, "multi-host: call jax.distributed.initialize() first; run the same "
      "command on every host"))


def mesh(multiple: bool = False) -> flags.FlagHolder:
  define = flags.DEFINE_multi_string if multiple else flags.DEFINE_string
  return _once("mesh", lambda: define(
      "mesh", None, "device mesh, e.g. data:-1 or fsdp:4,expert:8 (default: gin's "
      "MeshConfig.shape; empty = one device)" + ("; repeatable" if multiple else "")), multiple)


# --- shapes and numerics --------------------------------------------------------------------

def batch_size(multiple: bool = False) -> flags.FlagHolder:
  define = flags.DEFINE_multi_integer if multiple else flags.DEFINE_integer
  return _once("batch_size", lambda: define(
      "batch_size", None, "global batch in sequences (default: one per batch shard of the mesh)"
      + ("; repeatable: one table row each" if multiple else ""), lower_bound=1), multiple)


def seq_len(multiple: bool = False) -> flags.FlagHolder:
  define = flags.DEFINE_multi_integer if multiple else flags.DEFINE_integer
  return _once("seq_len", lambda: define(
      "seq_len", None, "sequence length in tokens (default: the run's, else the model's "
      "max_seq_len)" + ("; repeatable: one table row each" if multiple else ""), lower_bound=1), multiple)


def dtype() -> flags.FlagHolder:
  return _once("dtype", lambda: flags.DEFINE_enum(
      "dtype", None, list(DTYPES), "compute dtype; export: the written tensors' dtype (default: "
      "a --workdir run's own; bfloat16 for --hf_checkpoint, export and TPU targets; float32 for "
      "CPU benchmarks)"))


def max_new_tokens() -> flags.FlagHolder:
  return _once("max_new_tokens", lambda: flags.DEFINE_integer(
      "max_new_tokens", 64, "new tokens per prompt (fewer after EOS; 0: none)", lower_bound=0))


def n_routed_experts() -> flags.FlagHolder:
  return _once("n_routed_experts", lambda: flags.DEFINE_integer(
      "n_routed_experts", None, "routed experts (default: the model's)", lower_bound=1))


def n_shared_experts() -> flags.FlagHolder:
  return _once("n_shared_experts", lambda: flags.DEFINE_integer(
      "n_shared_experts", None, "shared experts (default: the model's)", lower_bound=0))


def layer_shape_flags() -> None:
  """The MoE layer benchmarks' shape (bench_moe, bench_routers): --tokens, --d_model,
  --expert_width, --n_activated_experts, with --n_routed_experts, --n_shared_experts, --reps."""
  _once("tokens", lambda: flags.DEFINE_integer("tokens", 4096, "tokens per batch (T)"))
  _once("d_model", lambda: flags.DEFINE_integer("d_model", 512, "model width"))
  _once("expert_width", lambda: flags.DEFINE_integer("expert_width", 128, "expert FFN width"))
  _once("n_activated_experts", lambda: flags.DEFINE_integer(
      "n_activated_experts", 6, "routed experts per token (top-k)"))
  n_routed_experts(), n_shared_experts(), reps()


def layer_shape() -> tuple[int, int, int, int, int, int, int]:
  """(T, d_model, routed experts (default 64), expert width, K', shared experts (default 2),
  reps) from layer_shape_flags."""
  f = flags.FLAGS
  e = 64 if f.n_routed_experts is None else f.n_routed_experts
  s = 2 if f.n_shared_experts is None else f.n_shared_experts
  return f.tokens, f.d_model, e, f.expert_width, f.n_activated_experts, s, f.reps


# --- timing and output ----------------------------------------------------------------------

def steps() -> flags.FlagHolder:
  return _once("steps", lambda: flags.DEFINE_integer(
      "steps", None, "steps to run (bench_data: batches read before the state is saved, default "
      "10000; bench_train: timed training steps per run, default 12)", lower_bound=1))


def reps() -> flags.FlagHolder:
  return _once("reps", lambda: flags.DEFINE_integer(
      "reps", 5, "timed repetitions; the median is reported", lower_bound=1))


def json_out() -> flags.FlagHolder:
  return _once("json_out", lambda: flags.DEFINE_string(
      "json_out", None, "also write the results as JSON to this file (overwritten)"))


def out_dir() -> flags.FlagHolder:
  """Not absl-required (its old name --out would fail the check): scripts that need it say so."""
  return _once("out_dir", lambda: flags.DEFINE_string(
      "out_dir", None, "output directory (export: new or empty, required; analyze: default "
      "FIRST_WORKDIR/analysis)"))
