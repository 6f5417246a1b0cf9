"""The package's layout rules (docs/design.md): programs apart, a TF-free core."""

import ast
import pathlib
import subprocess
import sys

import capjax

PACKAGE = pathlib.Path(capjax.__file__).parent
PROGRAMS = (
  'capjax.train',
  'capjax.sample',
  'capjax.evaluate',
  'capjax.serve',
  'capjax.convert',
  'capjax.features',
  'capjax.export',
)
# What runs on an accelerator host with only JAX installed: the model, its
# losses and decoding, the train step and state, checkpoint loading.
CORE = (
  'capjax.errors',
  'capjax.files',
  'capjax.workdir',
  'capjax.config_checks',
  'capjax.data.vocab',
  'capjax.data.schedule',
  'capjax.data.feature_store',
  'capjax.model.captioner',
  'capjax.model.recurrence',
  'capjax.model.losses',
  'capjax.model.search',
  'capjax.model.decoding',
  'capjax.model.inception',
  'capjax.metrics.cider',
  'capjax.porting.keras_inception',
  'capjax.training.state',
  'capjax.training.step',
  'capjax.training.checkpoints',
  'capjax.training.parallel',
  'capjax.training.preemption',
  'capjax.inference',
)
MAX_MODULE_LINES = 500


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _capjax_imports(path: pathlib.Path) -> set[str]:
  """The capjax modules a file imports, at any depth of its code."""
  imported = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      imported.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      # `from capjax import train` imports the module capjax.train.
      imported.update(f'{node.module}.{a.name}' for a in node.names)
      imported.add(node.module)
  return {name for name in imported if name.startswith('capjax')}


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in PACKAGE.rglob('*.py')}


def test_the_programs_exist():
  assert set(PROGRAMS) <= set(_modules())


def test_no_module_imports_a_program():
  importers = {
    name: sorted(_capjax_imports(path) & set(PROGRAMS))
    for name, path in _modules().items()
  }
  assert {name: found for name, found in importers.items() if found} == {}


def test_core_modules_import_without_tensorflow():
  # One interpreter: imports accumulate, so the first module after which
  # TensorFlow (or Keras, or h5py) is loaded is the one that loaded it.
  code = '\n'.join(
    [
      'import importlib, sys',
      f'for name in {CORE!r}:',
      '  importlib.import_module(name)',
      '  loaded = {"tensorflow", "keras", "h5py"} & set(sys.modules)',
      '  if loaded:',
      '    sys.exit(f"{name} imports {sorted(loaded)}")',
    ]
  )
  result = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, check=False
  )
  assert result.returncode == 0, result.stderr[-2000:]


def test_no_module_is_over_the_size_limit():
  sizes = {
    name: len(path.read_text().splitlines())
    for name, path in _modules().items()
  }
  assert {n: s for n, s in sizes.items() if s > MAX_MODULE_LINES} == {}


def _run_program(body: str) -> subprocess.CompletedProcess:
  code = '\n'.join(
    [
      'from capjax import errors, programs',
      'def main(argv):',
      f'  {body}',
      'programs.run(main, tensorflow_gpus=True)',
    ]
  )
  return subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, check=False
  )


def test_a_user_error_is_one_line_and_exit_1():
  result = _run_program("raise errors.UserError('no such file: x.json')")
  assert result.returncode == 1
  assert result.stderr.strip() == 'error: no such file: x.json'


def test_any_other_error_keeps_its_traceback():
  result = _run_program("raise ValueError('a bug')")
  assert result.returncode == 1
  assert 'Traceback' in result.stderr and 'ValueError: a bug' in result.stderr


def test_tensorflow_is_hidden_from_gpus_when_first_imported():
  # Programs that never use TensorFlow must not import it to hide the GPUs;
  # whatever imports it later gets it with the GPUs hidden.
  code = '\n'.join(
    [
      'import sys',
      'from capjax import programs',
      'hidden = []',
      'programs._hide_gpus = lambda tf: hidden.append(tf.__name__)',
      'def main(argv):',
      '  assert "tensorflow" not in sys.modules',
      '  import tensorflow_datasets  # imports tensorflow itself',
      '  import tensorflow as tf',
      '  assert hidden == ["tensorflow"], hidden',
      '  print(tf.constant(2.0).numpy())',
      'programs.run(main)',
    ]
  )
  result = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, check=False
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == '2.0'
