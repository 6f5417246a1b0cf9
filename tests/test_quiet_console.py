"""The console of every program holds capjax's own lines only.

No library's warning reaches it: not in a normal run of `sample`,
`evaluate` or `serve`, nor when training resumes past a damaged checkpoint.
"""

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import pytest

import capjax
from capjax.testing import serving
from capjax.testing import training as testing_lib
from capjax.training import damage
from capjax.training import loop

# Runs of the training loop share their compiled steps.
pytestmark = pytest.mark.usefixtures('compilation_cache')

_CAPJAX_FILES = {
  path.name for path in pathlib.Path(capjax.__file__).parent.rglob('*.py')
}
# absl's format of a log record: level, date, time, thread, file:line.
_RECORD = re.compile(r'[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ (\S+):\d+\] ')


def _foreign_lines(output: str) -> list[str]:
  """The lines of a program's stderr that are not capjax's own.

  capjax's own are its log records (they name a capjax module) and the
  one-line `error: ...` of a user's mistake.
  """
  return [
    line
    for line in output.splitlines()
    if not (
      ((record := _RECORD.match(line)) and record[1] in _CAPJAX_FILES)
      or line.startswith('error: ')
    )
  ]


def test_the_check_finds_what_libraries_printed():
  # Lines that programs printed before they were kept off the console.
  printed = [
    'I1203 03:39:37.139930 140192446704512 inference.py:86] loading the '
    'best checkpoint (step 6, validation CIDEr 0) from /w/best_checkpoint',
    'W1203 03:39:37.049960 140192446704512 checkpoint_manager.py:452] '
    'CheckpointManagerOptions.read_only=True, setting save_interval_steps=0.',
    'WARNING: All log messages before absl::InitializeLog() is called are '
    'written to STDERR',
    'I0000 00:00:1796269242.981833   22297 port.cc:153] oneDNN custom '
    'operations are on.',
    'Exception ignored in: <coroutine object _read_array_index_and_device_put'
    ' at 0x7f23b8234040>',
    "error: config.dtype must be one of float32, bfloat16, got 'float16'",
  ]
  assert _foreign_lines('\n'.join(printed)) == printed[1:5]


def _run(*args: str, env=None) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, *args],
    capture_output=True,
    text=True,
    cwd=testing_lib.REPO_ROOT,
    env={**os.environ, **(env or {})},
    timeout=600,
    check=False,
  )


@pytest.mark.slow
def test_sample_evaluate_and_serve_print_only_capjax_lines(
  trained_workdir, tmp_path, compilation_cache
):
  image = next((trained_workdir / 'examples').glob('*.png'))
  sample = _run(
    '-m', 'capjax.sample', f'--workdir={trained_workdir}', str(image)
  )
  assert sample.returncode == 0, sample.stderr
  assert _foreign_lines(sample.stderr) == []
  evaluate = _run(
    '-m',
    'capjax.evaluate',
    f'--workdir={trained_workdir}',
    '--split=test',
  )
  assert evaluate.returncode == 0, evaluate.stderr
  assert _foreign_lines(evaluate.stderr) == []
  log = tmp_path / 'serve.log'
  process, _ = serving.start_subprocess(
    [f'--workdir={trained_workdir}', '--max_batch_size=1'],
    str(log),
    env=serving.compilation_cache_env(compilation_cache),
  )
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=60) == 0
  started = log.read_text()
  assert 'serving on http://' in started
  assert _foreign_lines(started) == []


# Resumes each workdir of argv past its damaged newest step, in one process
# started as every capjax program is (`programs.run`): the console is the
# program's, and the steps compile once.
_RESUME_EACH = """
import sys
from capjax import programs
from capjax.testing import training
from capjax.training import loop

def main(argv):
  shapes_dir, steps, *workdirs = argv[1:]
  for workdir in workdirs:
    config = training.tiny_config(shapes_dir, num_train_steps=int(steps))
    loop.train_and_evaluate(config, workdir)

programs.run(main)
"""
_STEPS = 8  # checkpoints at steps 4 and 8


@pytest.mark.slow
def test_resuming_past_a_damaged_step_prints_only_capjax_lines(
  tmp_path, compilation_cache
):
  shapes_dir, trained = tmp_path / 'shapes', tmp_path / 'trained'
  loop.train_and_evaluate(
    testing_lib.tiny_config(shapes_dir, num_train_steps=_STEPS), str(trained)
  )
  copies = []
  for k in range(10):
    copy = tmp_path / f'copy{k}'
    shutil.copytree(trained, copy)
    # Every array file cut short: many reads fail, others are left pending.
    for path in (copy / 'checkpoints' / str(_STEPS)).rglob('*'):
      if path.is_file() and path.parent.name == 'd':
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    copies.append(str(copy))
  resumed = _run(
    '-c',
    _RESUME_EACH,
    str(shapes_dir),
    str(_STEPS),
    *copies,
    env=serving.compilation_cache_env(compilation_cache),
  )
  assert resumed.returncode == 0, resumed.stderr
  assert _foreign_lines(resumed.stderr) == []
  warnings = [
    line
    for line in resumed.stderr.splitlines()
    if f'checkpoint step {_STEPS} cannot be restored' in line
  ]
  assert len(warnings) == 10
  for line, copy in zip(warnings, copies):
    # The step, the file and the reason in words; no library object.
    assert '(a file is cut short: Error reading ' in line
    assert f'local file "{copy}/checkpoints/{_STEPS}/default/' in line
    assert '<' not in line and 'tensorstore_spec' not in line
    assert line.endswith(
      f'moved to {pathlib.Path(copy) / damage.DAMAGED_DIR / str(_STEPS)}'
    )
