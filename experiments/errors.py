"""Errors as one line: a script ends on the project's own errors (a bad config, flag,
checkpoint, mesh, topology or data; a non-finite loss) with `error: MESSAGE` on stderr and
exit status 1, not a traceback; --traceback shows the traceback instead (bug reports)."""

from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags

from experiments import common_flags
from experiments.accelerators import cpu_unless_accelerator
from moe.hub.hf_config import CheckpointFormatError
from moe.parallel.mesh import MeshError
from moe.train.checkpoint import CheckpointError

_TRACEBACK = flags.DEFINE_bool("traceback", False, "on an error, raise it with its traceback "
                               "instead of printing one line")

# What bad input raises: configs, flags, shapes and meshes (ValueError and its subclasses:
# MeshError, TopologyError, CheckpointFormatError), files (OSError), checkpoints, NaN stops.
INPUT_ERRORS = (ValueError, OSError, CheckpointError, FloatingPointError)
_GIN_CONTEXT = "\n  In call to configurable"  # gin appends where the error was raised
# What a message is about where the error's type says so and the message may not.
_SUBJECTS = ((MeshError, "bad mesh: "), (CheckpointFormatError, "bad checkpoint: "))


def one_line(e: BaseException) -> str:
  """`error: [SUBJECT: ]MESSAGE`, the message's lines joined, gin's call-site note dropped."""
  subject = next((s for kind, s in _SUBJECTS if isinstance(e, kind)), "")
  message = str(e).split(_GIN_CONTEXT)[0]
  return "error: " + subject + " ".join(line.strip() for line in message.splitlines() if line.strip())


SHARED_FLAG_MODULES = ("experiments.errors", "experiments.gin_flags", "experiments.common_flags")


def _show_shared_flags() -> None:
  """--help lists the main module's key flags only: make the shared flags (--traceback,
  --gin_file, --gin_bindings, common_flags') key flags of the script that imports them."""
  for name in SHARED_FLAG_MODULES:
    module = sys.modules.get(name)
    if module is not None:
      for flag in flags.FLAGS.get_key_flags_for_module(module):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)  # absl: the main module's name


def run(main: Callable[[list[str]], None], **kwargs) -> None:
  """absl's app.run(main), with INPUT_ERRORS printed as one line unless --traceback; the
  shared flags shown by --help; the CPU backend chosen where there is no accelerator."""
  _show_shared_flags()
  cpu_unless_accelerator()  # no libtpu start-up noise on machines without a TPU
  def guarded(argv):
    try:
      common_flags.apply_deprecated()
      return main(argv)
    except app.UsageError as e:  # absl would print the whole --help before the message
      raise SystemExit(one_line(e) + "  (--help for the flags)") from None
    except INPUT_ERRORS as e:
      if _TRACEBACK.value:
        raise
      raise SystemExit(one_line(e) + "  (--traceback for details)") from None
  app.run(guarded, **kwargs)
