"""Shared gin flags for experiment scripts: --gin_file, --gin_bindings, --gin.NAME=VALUE."""

from __future__ import annotations

import os
import sys

import gin
from absl import flags

from experiments import common_flags
# Every configurable registered, so every script reads the same gin files (a model-only
# script given a training config ignores nothing silently and fails on no unknown name).
import data.config  # noqa: F401,E402
import moe.model.presets  # noqa: F401,E402
import moe.parallel.mesh  # noqa: F401,E402
import moe.train.config  # noqa: F401,E402

_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "gin config file(s), applied in order")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "gin binding(s) 'NAME = VALUE' "
                                          "(also written --gin.NAME=VALUE)")

_SHORTHAND: list[str] = []
# `include 'experiments/configs/...'` in gin files resolves against the repository root too.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flags_parser(argv: list[str]) -> list[str]:
  """absl flags parser that also takes --gin.NAME=VALUE (as the binding NAME = VALUE)."""
  rest = [argv[0]]
  for arg in argv[1:]:
    if arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        raise flags.Error(f"{arg!r}: write --gin.NAME=VALUE")
      _SHORTHAND.append(f"{name} = {value}")
    else:
      rest.append(arg)
  try:
    return flags.FLAGS(rest)
  except flags.Error as e:
    sys.exit(f"{e}\nPass --help for the flags.")


def requested() -> tuple[list[str], list[str]]:
  """(gin files, bindings) given on the command line (--gin_file, --gin_bindings, --gin.*),
  unparsed: for scripts that hand them on (experiments.sweep)."""
  return list(_GIN_FILES.value), _preset_binding() + list(_GIN_BINDINGS.value) + _SHORTHAND


def _preset_binding() -> list[str]:
  """--preset as the binding it stands for, after the gin files and before other bindings."""
  flag = common_flags.defined("preset")
  return [f"model_config.preset = {flag.value!r}"] if flag is not None and flag.value else []


def parse(argv: list[str]) -> None:
  """Apply the gin files and bindings; unknown names and bad values fail with the binding named."""
  if len(argv) > 1:
    raise flags.Error(f"unexpected arguments: {argv[1:]}")
  bindings = _preset_binding() + list(_GIN_BINDINGS.value) + _SHORTHAND
  if REPO_ROOT not in gin.config._LOCATION_PREFIXES:  # noqa: SLF001 (gin has no getter)
    gin.add_config_file_search_path(REPO_ROOT)
  try:
    gin.parse_config_files_and_bindings(_GIN_FILES.value, bindings)
  except (ValueError, KeyError, SyntaxError, IOError) as e:
    message = " ".join(str(e).split())
    if "malformed node or string" in message or "Failed to parse token" in message:
      message += ("; a string value needs quotes inside the flag: --gin.NAME=\"'value'\" "
                  "(or NAME = 'value' in a gin file)")
    raise SystemExit(f"error: bad gin config: {message}; files: {_GIN_FILES.value}, "
                     f"bindings: {bindings}") from None
