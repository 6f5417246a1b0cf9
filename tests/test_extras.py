"""Optional dependencies: a program missing its extra says so in one line."""

import subprocess
import sys

import pytest

from capjax import programs

# Each program's entry with one module of its extra made unimportable
# (`sys.modules[name] = None` makes `import name` raise ModuleNotFoundError).
CASES = [
  ('capjax.serve', 'starlette', 'serve'),
  ('capjax.serve', 'prometheus_client', 'serve'),
]


@pytest.mark.parametrize(('program', 'module', 'extra'), CASES)
def test_a_missing_extra_is_one_line(program, module, extra):
  code = (
    'import runpy, sys\n'
    f'sys.modules[{module!r}] = None\n'
    f'sys.argv = [{program!r}, "--workdir=unused"]\n'
    f'runpy.run_module({program!r}, run_name="__main__", alter_sys=True)\n'
  )
  result = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, check=False
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
    f'error: this needs {module}, which is not installed: '
    f"pip install 'capjax[{extra}]'"
  ]


def test_other_missing_modules_keep_their_traceback():
  error = ModuleNotFoundError("No module named 'nonexistent'")
  error.name = 'nonexistent'
  assert programs.missing_extra(error) is None
  assert programs.missing_extra(ValueError('x')) is None
