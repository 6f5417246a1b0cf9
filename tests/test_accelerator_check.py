"""scripts/accelerator_check.py runs where TensorFlow, TFDS, ml_collections
and pycocoevalcap are not installed (capjax.benchmarks.accelerator)."""

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip(
  'torch',
  reason='PyTorch is optional (pip install '
  'capjax[bench]); the accelerator check needs it',
)

SCRIPT = (
  pathlib.Path(__file__).parent.parent / 'scripts' / 'accelerator_check.py'
)
ABSENT = (
  'tensorflow',
  'tensorflow_datasets',
  'ml_collections',
  'pycocoevalcap',
)
# None in sys.modules makes `import name` raise ImportError, as on a host
# without the package.
_WITHOUT = f"""
import runpy, sys
for name in {ABSENT!r}:
  sys.modules[name] = None
sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]
runpy.run_path({str(SCRIPT)!r}, run_name='__main__')
"""


def _check(out_dir: pathlib.Path, *flags: str) -> dict:
  result = subprocess.run(
    [sys.executable, '-c', _WITHOUT, '--quick', f'--out_dir={out_dir}', *flags],
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert (out_dir / 'accelerator.md').read_text() in result.stdout
  return json.loads((out_dir / 'accelerator.json').read_text())


def test_rows_past_the_time_budget_are_skipped(tmp_path):
  report = _check(tmp_path, '--time_budget_s=0')
  assert report['rows'] and all('skipped' in r for r in report['rows'])
  assert 'needs TensorFlow' in report['skipped'].values()


@pytest.mark.slow  # compiles every row, torch.compile included: about 90 s
def test_every_row_runs_without_tensorflow(tmp_path):
  report = _check(tmp_path)
  precision, *rows = report['rows']
  assert precision['capjax_default_precision'] < 1e-4
  assert precision['torch'] < 1e-4
  paths = [r for r in rows if r['row'].startswith('training data path')]
  # Each batch size of each dtype, on the three paths.
  assert len(paths) == 2 * len(report['settings']['plan']['train_batches'])
  for row in paths:
    assert all(row[p] > 0 for p in ('host_path', 'device_path', 'ceiling')), row
  assert (
    '| device / host | device / ceiling |'
    in (tmp_path / 'accelerator.md').read_text()
  )
  for row in (r for r in rows if r not in paths):
    assert row['capjax'] > 0, row
    if 'beam' not in row['row']:
      assert row['torch_eager'] > 0, row
      # torch.compile may fail on a host; then the row says why.
      assert 'torch_compiled' in row or 'torch_compiled' in row['errors'], row
