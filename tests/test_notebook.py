"""The Colab notebook runs top to bottom, twice (CPU, small settings); any failing cell fails.
Its first cell finds, fetches or names what to set for the repository, and installs on Colab
without a second TensorFlow."""

import os
import subprocess
import sys
import zipfile

import nbformat
from tests.capabilities import import_or_skip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "notebooks", "deepseekmoe_quickstart.ipynb")


def tagged_cell(tag: str) -> str:
  """The source of the notebook's code cell tagged `tag` (cell metadata "tags")."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  (cell,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
  return cell.source


def setup_functions() -> dict:
  """The setup cell's settings and functions, without running its actions."""
  source = tagged_cell("setup")
  defs, sep, _ = source.partition("\nREPO = checkout_under(")
  assert sep, "the setup cell's actions start at REPO = checkout_under(...)"
  namespace = {}
  exec(defs, namespace)
  return namespace


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
    assert f"repository: {ROOT}" in outputs  # found the checkout it was opened from
    # conftest's 8 simulated CPU devices: all of them, data parallel.
    assert "mesh {'data': 8, 'fsdp': 1, 'expert': 1, 'tensor': 1} over 8 x cpu" in outputs
    assert f"WORKDIR: {tmp_path / 'run'}" in outputs
    assert "experts ruled out" in outputs
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) == 3


def test_setup_cell_without_a_checkout_names_what_to_set(tmp_path):
  """Outside a checkout, with the placeholder URL and no zip: one message naming both."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "MOE_REPO_URL", "MOE_REPO_ZIP")}
  env["MOE_REPO_ZIP"] = str(tmp_path / "missing.zip")
  proc = subprocess.run([sys.executable, "-c", tagged_cell("setup")], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr
  message = proc.stderr.strip()
  assert "\n" not in message, message  # SystemExit: the message alone, no traceback
  assert "set REPO_URL" in message and "YOUR_ACCOUNT" in message
  assert "REPO_ZIP" in message and "missing.zip" in message
  assert not os.listdir(tmp_path)  # nothing cloned or unpacked


def test_setup_cell_finds_the_checkout_inside_a_github_zip(tmp_path, monkeypatch):
  archive = tmp_path / "deepseekmoe-jax-main.zip"
  with zipfile.ZipFile(archive, "w") as z:  # GitHub's "Download ZIP": one top-level folder
    for name in ("moe/__init__.py", "experiments/__init__.py", "pyproject.toml",
                 "tests/moe/x.py"):
      z.writestr(f"deepseekmoe-jax-main/{name}", "")
  monkeypatch.setenv("MOE_REPO_ZIP", str(archive))
  monkeypatch.delenv("MOE_REPO_URL", raising=False)
  monkeypatch.chdir(tmp_path)
  fns = setup_functions()
  assert "YOUR_ACCOUNT" in fns["REPO_URL"]  # the default is the marked placeholder
  assert fns["fetch_repo"]() == str(tmp_path / "deepseekmoe-jax" / "deepseekmoe-jax-main")
  assert fns["checkout_under"](str(tmp_path / "deepseekmoe-jax" / "deepseekmoe-jax-main" / "moe")) \
      == str(tmp_path / "deepseekmoe-jax" / "deepseekmoe-jax-main")


def test_colab_install_keeps_colabs_tensorflow():
  """pyproject's dependencies minus TensorFlow itself, and the package with --no-deps."""
  import tomllib

  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
  colab = setup_functions()["colab_requirements"](ROOT)
  assert not [d for d in colab if d.startswith(("tensorflow>", "tensorflow-cpu"))], colab
  assert any(d.startswith("tensorflow-datasets") for d in colab)  # tfds runs on Colab's TF
  assert len(colab) == len(deps) - 1
  assert '"pip", "install", "-q", "--no-deps", "-e", "."' in tagged_cell("setup")
