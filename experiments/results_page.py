"""Write a results page from its template: tables and numbers from the run files.

  python -m experiments.results_page                       # docs/results.md
  python -m experiments.results_page --template=T --page=P  # another page
"""

from __future__ import annotations

import os

from absl import app, flags

from experiments import errors
from experiments.gin_flags import REPO_ROOT
from moe.research.results_page import render

_TEMPLATE = flags.DEFINE_string("template", "docs/results.template.md", "the page's template (relative to the repository)")
_PAGE = flags.DEFINE_string("page", "docs/results.md", "the page to write (relative to the repository)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = os.path.join(REPO_ROOT, _PAGE.value)
  page = render(os.path.join(REPO_ROOT, _TEMPLATE.value), REPO_ROOT, plots=True, page_dir=os.path.dirname(out))
  with open(out, "w") as f:
    f.write(page)
  print(f"written: {_PAGE.value}")


if __name__ == "__main__":
  errors.run(main)
