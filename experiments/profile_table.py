"""Where a profiled run's training steps spent their time, by the model's named scopes.

  python -m experiments.train --workdir=W --profile_steps=20:24 ...
  python -m experiments.profile_table --workdir=W

Every kernel of the traced steps is charged to the scope of its instruction (attention,
router, dispatch, routed_experts, shared_experts, dense_ffn, lm_head_loss, embedding,
optimizer; "other": unscoped work such as the metrics and balance losses); "between kernels"
is time inside a step when no kernel ran (moe.train.profile.breakdown).
"""

from __future__ import annotations


from experiments import common_flags, errors
from moe.parallel import compiled_cost
from moe.train.plan import COMPONENTS
from moe.train.profile import Breakdown, breakdown

_WORKDIR = common_flags.workdir()


def format_table(b: Breakdown) -> str:
  """Milliseconds per step and share of the step's wall time, largest first."""
  rows = ["| component | ms / step | share of the step |", "|---|---:|---:|"]
  for name, seconds in [*b.components.items(), ("between kernels (framework)", b.between_kernels_s)]:
    rows.append(f"| {name} | {seconds * 1e3:.1f} | {seconds / b.wall_s:.1%} |")
  rows.append(f"| **step (first to last kernel)** | {b.wall_s * 1e3:.1f} | 100% |")
  rows.append(f"| between steps (host) | {b.between_steps_s * 1e3:.1f} | |")
  return "\n".join(rows)


def main(argv):
  del argv
  b = breakdown(f"{_WORKDIR.value}/profile", compiled_cost.scope_component(COMPONENTS))
  print(f"{b.steps} traced steps of {_WORKDIR.value}; kernels running at once are each counted, "
        f"so the components can sum past the step")
  print(format_table(b))


if __name__ == "__main__":
  errors.run(main)
