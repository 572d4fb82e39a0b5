"""One flag vocabulary: every script's flags collected, one name per concept, one definition
per name; old names still work with one deprecation line."""

import glob
import json
import os
import subprocess
import sys

import pytest
from absl import app, flags

from experiments import common_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = {"experiments.common_flags", "experiments.gin_flags", "experiments.errors"}


def scripts() -> list[str]:
  """Every command-line script under experiments/ (they all end in errors.run)."""
  found = []
  for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py"))):
    with open(path) as f:
      if "errors.run(main" in f.read():
        found.append("experiments." + os.path.basename(path)[:-3])
  return found


# Imports each script in a forked child (JAX and absl imported once) and prints, per script,
# the flags that experiments' modules define: name -> [defining module, type, default, help].
_COLLECT = """
import json, multiprocessing as mp, sys
import jax, flax, optax  # noqa: F401  (imported once, before forking)
from absl import flags

def collect(name):
  import importlib
  importlib.import_module(name)
  out = {}
  for flag_name, flag in flags.FLAGS._flags().items():
    module = flags.FLAGS.find_module_defining_flag(flag_name)
    if module and module.startswith("experiments") and flag_name == flag.name:
      out[flag_name] = [module, flag.flag_type(), repr(flag.default), flag.help]
  return out

with mp.get_context("fork").Pool(2, maxtasksperchild=1) as pool:  # a fresh process per script
  print(json.dumps(dict(zip(sys.argv[1:], pool.map(collect, sys.argv[1:], chunksize=1)))))
"""


@pytest.fixture(scope="module")
def definitions() -> dict[str, dict[str, list[str]]]:
  out = subprocess.run([sys.executable, "-c", _COLLECT] + scripts(), cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_script_is_collected(definitions):
  assert len(definitions) >= 14 and "experiments.train" in definitions
  # The shared flags arrive through the shared module, not a copy per script.
  assert definitions["experiments.plan"]["batch_size"][0] == "experiments.common_flags"
  assert definitions["experiments.train"]["mesh"][0] == "experiments.common_flags"


def test_one_definition_per_name(definitions):
  """A name two scripts take is defined once, in a shared module, with one default and help."""
  by_name: dict[str, dict[str, list[str]]] = {}
  for script, defined in definitions.items():
    for name, definition in defined.items():
      by_name.setdefault(name, {})[script] = definition
  for name, where in by_name.items():
    if len(where) > 1:
      modules = {d[0] for d in where.values()}
      assert modules <= SHARED | {"experiments.common_flags.deprecated"}, (
          f"--{name} is defined separately in {sorted(where)}: define it once in common_flags")
      defaults = {d[2] for d in where.values()}
      assert len(defaults) == 1, f"--{name} has defaults {defaults} in {sorted(where)}"


def test_one_name_per_concept(definitions):
  """No script defines a concept's canonical name or an old name on its own."""
  concept_names = set(common_flags.DEPRECATED) | {old for olds in common_flags.DEPRECATED.values()
                                                   for old in olds}
  for script, defined in definitions.items():
    for name, (module, *_) in defined.items():
      if name in concept_names:
        assert module.startswith("experiments.common_flags"), (
            f"{script} defines --{name} itself; use common_flags (one name per concept)")
  old_names = {old for olds in common_flags.DEPRECATED.values() for old in olds}
  canonical = {name for defined in definitions.values() for name, d in defined.items()
               if d[0] != "experiments.common_flags.deprecated"}
  assert not old_names & canonical, f"old names in use as flags of their own: {old_names & canonical}"


def test_old_names_set_the_new_flag(capsys, monkeypatch):
  fv = flags.FlagValues()  # private: the process's flags stay as they are
  aliases = {"batch": common_flags.Alias("batch", "batch_size", int),
             "new_tokens": common_flags.Alias("new_tokens", "max_new_tokens", int)}
  monkeypatch.setattr(common_flags, "_ALIASES", aliases)
  for old in aliases:
    flags.DEFINE_string(old, None, "deprecated", flag_values=fv)
  flags.DEFINE_integer("batch_size", None, "batch", flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", 64, "tokens", flag_values=fv)
  fv(["prog", "--batch=4", "--new_tokens=9"])
  common_flags.apply_deprecated(fv)
  assert fv.batch_size == 4 and fv.max_new_tokens == 9
  assert capsys.readouterr().err.splitlines() == [
      "warning: --batch is deprecated; use --batch_size",
      "warning: --new_tokens is deprecated; use --max_new_tokens"]
  fv.unparse_flags()
  fv(["prog", "--batch=4", "--batch_size=5"])
  with pytest.raises(app.UsageError, match="same flag"):
    common_flags.apply_deprecated(fv)


def test_old_name_on_the_command_line(tmp_path):
  """export's old --out: one deprecation line, then the run goes on (here to the missing
  workdir's one-line error)."""
  out = subprocess.run([sys.executable, "-m", "experiments.export", f"--workdir={tmp_path / 'nope'}",
                        f"--out={tmp_path / 'hf'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 1
  assert "warning: --out is deprecated; use --out_dir" in lines
  assert lines[-1].startswith("error:") and "nope" in lines[-1], lines[-3:]
  assert not (tmp_path / "hf").exists()


def test_help_shows_the_shared_flags():
  out = subprocess.run([sys.executable, "-m", "experiments.plan", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  for name in ("--batch_size", "--mesh", "--preset", "--dtype", "--json_out", "--gin_file"):
    assert name in out.stdout, name
  assert "--batch:" not in out.stdout and "deprecated" not in out.stdout
