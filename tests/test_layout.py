"""The package layout holds: imports point one way, the model loads no kernel, no module
grows past 300 lines, and the README's layout table lists every module."""

import ast
import functools
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subpackages of moe/ from the bottom up: each may import itself and those before it.
LAYERS = ["dispatch", "parallel", "model", "decode", "hub", "train", "research"]
LEAVES = {"moe", "moe.cache", "moe.cpu_build", "moe.cpu_threads", "moe.scoped"}  # top-level modules any layer may use
PACKAGES = ("moe", "data", "pallas_kernels", "experiments")


@functools.cache
def modules(package: str) -> dict[str, str]:
  """{dotted module name: path} of every .py file under the package."""
  out = {}
  for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = path
  return out


def imported(path: str) -> set[str]:
  """Every module a file imports, at any depth (function-level imports included);
  `from package import module` counts as importing package.module."""
  ours = {m for package in PACKAGES for m in modules(package)}
  names = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update({f"{node.module}.{a.name}" for a in node.names} & ours)
  return names


def layer_of(module: str) -> int | None:
  parts = module.split(".")
  if len(parts) > 1 and parts[1] in LAYERS:
    return LAYERS.index(parts[1])
  return None


def upward(module: str, names: set[str]) -> list[str]:
  """The imports in `names` that module `module` of moe/ may not make."""
  mine = layer_of(module)
  wrong = []
  for name in names:
    top = name.split(".")[0]
    if top in ("experiments", "tests") or (top == "data" and mine < LAYERS.index("train")):
      wrong.append(f"{module} imports {name}")
    elif top == "moe" and name not in LEAVES:
      theirs = layer_of(name)
      if theirs is None or theirs > mine:
        wrong.append(f"{module} ({LAYERS[mine]}) imports {name}")
  return wrong


def test_imports_point_down_the_layers():
  wrong = [w for module, path in modules("moe").items() if module not in LEAVES
           for w in upward(module, imported(path))]
  assert not wrong, "upward imports:\n" + "\n".join(sorted(wrong))


def test_the_layer_check_can_fail():
  assert upward("moe.model.decoder", {"moe.train.loop", "moe.parallel.rules", "jax"}) == [
      "moe.model.decoder (model) imports moe.train.loop"]
  assert upward("moe.dispatch.backend", {"moe.model.config"})
  assert upward("moe.parallel.mesh", {"data.input_pipeline"})
  assert upward("moe.decode.generate", {"moe.train.restore"})  # decoding stays below training
  assert not upward("moe.decode.generate", {"moe.model.decoder", "moe.parallel.rules"})
  assert upward("moe.research.report", {"experiments.train"})
  assert not upward("moe.research.report", {"data.input_pipeline", "moe.train.restore", "moe.cache"})


def test_data_and_kernels_stay_below_the_model():
  for package, allowed in (("data", {"moe.cache"}), ("pallas_kernels", set())):
    for module, path in modules(package).items():
      used = {n for n in imported(path) if n.split(".")[0] in ("moe", "experiments")}
      assert used <= allowed | {"moe"}, f"{module} imports {sorted(used - allowed)}"


def test_importing_the_model_loads_no_kernel():
  code = ("import sys, moe.model.decoder, moe.model.counts, moe.model.presets, moe.model.intervention\n"
          "print(sorted(m for m in sys.modules if m.startswith(('pallas_kernels', 'jax.experimental.pallas',"
          " 'moe.dispatch.cpu_kernel', 'moe.model.cpu_', 'moe.train', 'moe.research'))))")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_over_300_lines(package):
  long = {m: n for m, p in modules(package).items() if (n := len(open(p).read().splitlines())) > 300}
  assert not long, long


def test_readme_layout_table_lists_every_module():
  readme = open(os.path.join(ROOT, "README.md")).read()
  table = readme[readme.index("## Layout"):readme.index("\n## ", readme.index("## Layout") + 1)]
  missing = [os.path.relpath(p, ROOT) for package in PACKAGES for p in modules(package).values()
             if os.path.basename(p) != "__init__.py" and os.path.relpath(p, ROOT) not in table]
  assert not missing, f"modules missing from the README's layout table: {missing}"


def requirement_lines(name: str) -> list[str]:
  lines = [l.split("#")[0].strip() for l in open(os.path.join(ROOT, name))]
  return [l for l in lines if l and not l.startswith("-r")]


def test_pyproject_pins_are_the_requirements_files():
  import tomllib
  project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
  assert project["dependencies"] == requirement_lines("requirements.txt")
  assert project["optional-dependencies"]["dev"] == requirement_lines("requirements-dev.txt")


def test_ci_turns_skips_for_missing_tools_into_failures(monkeypatch):
  """.ci/run requires every optional capability, so a broken libtpu or torch install fails
  CI instead of skipping the tests that need it; elsewhere they skip."""
  from tests import capabilities

  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci = f.read()
  assert re.search(rf"{capabilities.ENV_VAR}=all\b", ci), ci
  monkeypatch.setenv(capabilities.ENV_VAR, "all")
  with pytest.raises(pytest.fail.Exception, match="tpu_compiler is required"):
    capabilities.skip_or_fail("tpu_compiler", "libtpu would not load")
  monkeypatch.setenv(capabilities.ENV_VAR, "torch")
  with pytest.raises(pytest.skip.Exception):
    capabilities.skip_or_fail("tpu_compiler", "libtpu would not load")
  monkeypatch.setenv(capabilities.ENV_VAR, "tpu_compilr")
  with pytest.raises(ValueError, match="unknown"):
    capabilities.required()
