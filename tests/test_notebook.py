"""The Colab notebook runs top to bottom, twice (CPU, small settings); any failing cell fails."""

import os

import nbformat
import pytest
from tests.capabilities import import_or_skip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "notebooks", "deepseekmoe_quickstart.ipynb")


def test_notebook_executes(tmp_path, small_corpus, monkeypatch):
  nbclient = import_or_skip("nbclient", "notebook")
  source_dir, data_dir = small_corpus
  for key, value in dict(NB_STEPS="4", NB_SMALL="1", NB_SOURCE_DIR=source_dir, NB_DATA_DIR=data_dir,
                         NB_WORKDIR=str(tmp_path / "run")).items():
    monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
  # Twice, top to bottom: the second run finds the run finished and works from its checkpoint.
  for status in ("finished at step 4", "nothing_to_do at step 4"):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert status in outputs
    assert "experts ruled out" in outputs
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) == 3


def test_colab_cell_installs_the_package_from_one_url_variable():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  install = nb.cells[1].source
  assert 'REPO_URL = os.environ.get("MOE_REPO_URL", "")' in install
  assert '"pip", "install", "-q", "-e", "."' in install
  assert "github.com" not in install and "YOUR_" not in install  # no placeholder URL
