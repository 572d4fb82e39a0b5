"""The notebook's training step, compiled by the TPU compiler (libtpu) for Colab's TPU
runtimes on this CPU host: the model, data, training and mesh settings of its settings cell
(as a Colab run uses them, not the tests' small ones), each slice one host as on Colab.
Fails if the step does not compile or does not fit the chip's memory. Skipped, with the
reason, where libtpu cannot load."""


import jax
import pytest

from moe.parallel import topology
from moe.parallel.mesh import make_mesh
from moe.train.plan import plan
from tests.capabilities import tpu_devices_or_skip
from tests.test_notebook import tagged_cell

# Colab's TPU runtimes: v5e and v6e with 1 or 8 chips, one host.
COLAB_TPUS = ["v5e:1x1", "v5e:2x4", "v6e:1x1", "v6e:2x4"]


@pytest.fixture(scope="module")
def settings():
  """The settings cell's namespace, run without the tests' NB_* overrides."""
  with pytest.MonkeyPatch.context() as mp:
    for key in ("NB_SMALL", "NB_STEPS"):
      mp.delenv(key, raising=False)
    namespace = {}
    exec(tagged_cell("settings"), namespace)
  return namespace


def colab_devices(name: str) -> list:
  """Slice `name` as one host holding all its chips, as a Colab runtime."""
  devices = tpu_devices_or_skip(name, one_host=True)
  assert {d.process_index for d in devices} == {0}, devices
  return devices


def test_the_training_cell_trains_the_settings_cells_configs():
  """What the tests below compile is what the training cell runs."""
  assert "train_and_evaluate(WORKDIR, model_cfg, data_cfg, train_cfg, mesh_cfg=MESH)" in tagged_cell("train")


@pytest.mark.parametrize("name", COLAB_TPUS)
def test_the_notebooks_train_step_compiles_and_fits_on_colabs_tpus(name, settings):
  mesh = make_mesh(settings["MESH"], colab_devices(name))
  data_cfg = settings["data_cfg"]
  # As the notebook runs: JAX's default matmul precision, not the suite's "highest" (conftest).
  with jax.default_matmul_precision("default"):
    p = plan(settings["model_cfg"], settings["train_cfg"], mesh, data_cfg.batch_size, data_cfg.seq_len)
  generation, chips = topology.parse(name)
  assert p.n_devices == chips and p.tokens_per_device == data_cfg.batch_size * data_cfg.seq_len // chips
  assert 0 < p.peak_bytes < topology.HBM_GIB[generation] * 2**30, p
