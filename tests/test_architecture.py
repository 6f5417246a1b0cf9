"""The package's layout rules (docs/design.md): layers, a TF-free core."""

import ast
from collections.abc import Iterator
import pathlib
import re
import subprocess
import sys

import pytest

import capjax
from capjax import layers

PACKAGE = pathlib.Path(capjax.__file__).parent
DESIGN_DOC = PACKAGE.parent / 'docs' / 'design.md'
# What runs on an accelerator host with only JAX installed: the model, its
# losses and decoding, the train step and state, checkpoint loading.
CORE = (
  'capjax.errors',
  'capjax.tokens',
  'capjax.layers',
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
  'capjax.model.keras_inception',
  'capjax.metrics.cider',
  'capjax.training.state',
  'capjax.training.step',
  'capjax.training.checkpoints',
  'capjax.training.parallel',
  'capjax.training.preemption',
  'capjax.training.device_data',
  'capjax.training.dispatch',
  'capjax.inference',
)
MAX_MODULE_LINES = 500


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in PACKAGE.rglob('*.py')}


def _relative(name: str) -> str:
  """capjax.data.vocab -> data.vocab; capjax -> __init__, as in layers."""
  return name.partition('.')[2] or '__init__'


def _capjax_imports(
  package: str, source: str, modules: set[str]
) -> Iterator[tuple[int, str]]:
  """(line, module) of each capjax module that `source`, in `package`, imports.

  Imports at any depth count, function-local ones included; `from capjax.x
  import y` imports module capjax.x.y where that is a module, else capjax.x.
  """
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split('.')[0] == 'capjax':
          yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative: from the module's own package up
        parent = package.split('.')[: len(package.split('.')) - node.level + 1]
        base = '.'.join(parent + ([base] if base else []))
      if base.split('.')[0] != 'capjax':
        continue
      for alias in node.names:
        name = f'{base}.{alias.name}'
        yield node.lineno, name if name in modules else base


def _violations(
  module: str, source: str, filename: str, modules: set[str]
) -> list[str]:
  """One line per import that module's rule in capjax.layers does not allow."""
  allowed = layers.rule(_relative(module))
  is_package = filename.endswith('__init__.py')
  package = module if is_package else module.rpartition('.')[0]
  found = []
  for line, imported in _capjax_imports(package, source, modules):
    if not layers.allows(allowed, _relative(imported)):
      found.append(
        f'{filename}:{line}: {_relative(module)} imports '
        f'{_relative(imported)}; its rule in capjax/layers.py allows '
        f'{_describe(allowed)}'
      )
  return found


def _describe(allowed) -> str:
  if isinstance(allowed, str):
    return allowed
  return ', '.join(allowed) if allowed else 'nothing of capjax'


def test_the_programs_exist():
  assert {f'capjax.{p}' for p in layers.PROGRAMS} <= set(_modules())


def test_every_module_has_a_rule():
  assert [n for n in _modules() if layers.rule(_relative(n)) is None] == []


def test_every_import_is_allowed():
  modules = _modules()
  found = [
    v
    for name, path in sorted(modules.items())
    for v in _violations(
      name,
      path.read_text(),
      str(path.relative_to(PACKAGE.parent)),
      set(modules),
    )
  ]
  if found:
    pytest.fail('imports outside the layers:\n' + '\n'.join(found), False)


def test_function_local_imports_are_checked():
  source = 'def load():\n  from capjax.training import loop\n'
  found = _violations(
    'capjax.model.search', source, 'search.py', set(_modules())
  )
  assert found == [
    'search.py:2: model.search imports training.loop; its rule in '
    'capjax/layers.py allows tokens'
  ]


def _expanded(allowed, modules: list[str]) -> set[str]:
  """The modules a rule allows, packages expanded, itself left out."""
  if isinstance(allowed, str):
    return set()
  return {m for m in modules if layers.allows(allowed, m)}


def test_the_rules_form_layers():
  """Each rule names real modules and no program; together, no cycle."""
  modules = [_relative(n) for n in _modules()]
  named = {
    a for r in layers.MAY_IMPORT.values() if isinstance(r, tuple) for a in r
  }
  assert {a for a in named if not _expanded((a,), modules)} == set()
  assert named.isdisjoint(layers.PROGRAMS)
  graph = {
    m: _expanded(layers.rule(m), modules) - {m}
    for m in modules
    if layers.rule(m) is not None
  }
  # Depth-first search; a module met again on the current path is a cycle.
  state, cycles = {}, []

  def visit(module, path):
    state[module] = 'open'
    for nxt in sorted(graph.get(module, ())):
      if state.get(nxt) == 'open':
        cycles.append(path[path.index(nxt) :] + [nxt])
      elif nxt not in state:
        visit(nxt, path + [nxt])
    state[module] = 'done'

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert cycles == []


def _doc_rules() -> dict[str, str]:
  """Module map rows of docs/design.md: {module: its "may import" cell}."""
  rows = {}
  for line in DESIGN_DOC.read_text().splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) == 3 and re.fullmatch(r'`[\w.*]+`', cells[0]):
      rows[cells[0].strip('`')] = cells[2]
  return rows


def test_the_design_doc_shows_the_rules():
  """Every module has a row whose "may import" names what its rule allows.

  Backquoted names are capjax's; other words in the cell (third-party
  libraries) are notes the test leaves alone.
  """
  packages = {
    _relative(n) for n, p in _modules().items() if p.name == '__init__.py'
  }
  doc = _doc_rules()
  expected = {m: r for m, r in layers.MAY_IMPORT.items() if m not in packages}
  assert set(doc) == set(expected)
  wrong = {}
  for module, allowed in expected.items():
    if isinstance(allowed, str):
      ok = doc[module] == allowed
    else:
      ok = set(re.findall(r'`([\w.]+)`', doc[module])) == set(allowed)
    if not ok:
      wrong[module] = (doc[module], _describe(allowed))
  assert wrong == {}


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
