"""Checkpoints: parameters-only restores, damaged steps, resuming past them."""

import gc
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import time
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from capjax import errors
from capjax import inference
from capjax import programs
from capjax.data import vocab as vocab_lib
from capjax.testing import serving
from capjax.testing import training as testing_lib
from capjax.training import checkpoints
from capjax.training import damage
from capjax.training import loop

# Runs of the training loop share their compiled steps.
pytestmark = pytest.mark.usefixtures('compilation_cache')

# Checkpoints at steps 4 and 8.
_STEPS = 8


@pytest.fixture(scope='module')
def shapes_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('shapes')


@pytest.fixture(scope='module')
def trained(tmp_path_factory, shapes_dir):
  """A workdir with two checkpoints; tests copy it before damaging it."""
  workdir = tmp_path_factory.mktemp('trained') / 'run'
  loop.train_and_evaluate(
    testing_lib.tiny_config(shapes_dir, num_train_steps=_STEPS), str(workdir)
  )
  # Without the best checkpoint, programs load the newest step, which these
  # tests damage; tests/test_best_checkpoint.py covers the best one.
  shutil.rmtree(checkpoints.best_directory(workdir))
  return workdir


@pytest.fixture
def copy(trained, tmp_path):
  target = tmp_path / 'run'
  shutil.copytree(trained, target)
  return target


def _data_files(workdir: pathlib.Path, step: int) -> list[pathlib.Path]:
  return sorted(
    p for p in (workdir / 'checkpoints' / str(step)).rglob('*') if p.is_file()
  )


def _largest_file(workdir: pathlib.Path, step: int) -> pathlib.Path:
  return max(_data_files(workdir, step), key=lambda p: p.stat().st_size)


def _truncate(path: pathlib.Path) -> None:
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def _truncate_arrays(workdir: pathlib.Path, step: int) -> None:
  """Truncates every array data file of a step (which holds what varies)."""
  for path in _data_files(workdir, step):
    if path.parent.name == 'd':
      _truncate(path)


def test_the_parameters_alone_equal_the_full_restore(trained):
  manager = checkpoints.manager(trained, read_only=True)
  full = manager.restore(_STEPS, args=ocp.args.StandardRestore())
  manager.close()
  step, params = checkpoints.restore_params(trained)
  assert step == _STEPS
  testing_lib.leaves_equal(params, full['params'])
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
    full['params']
  )


def test_a_damaged_step_is_named_with_the_good_one(copy):
  _truncate_arrays(copy, _STEPS)
  with pytest.raises(
    checkpoints.DamagedCheckpointError,
    match=rf'checkpoint step {_STEPS} in .* cannot be read '
    r'.*step 4 can be read: pass --step 4',
  ):
    inference.load_trained(copy)
  assert inference.load_trained(copy, step=4).step == 4


def test_sample_reports_a_damaged_step_in_one_line(copy):
  _truncate_arrays(copy, _STEPS)
  image = next((copy / 'examples').glob('*.png'))
  result = subprocess.run(
    [sys.executable, '-m', 'capjax.sample', f'--workdir={copy}', str(image)],
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert f'error: checkpoint step {_STEPS}' in result.stderr
  assert 'pass --step 4' in result.stderr


@types.coroutine
def _suspend():
  yield


async def _read_array_index_and_device_put():
  """Orbax's read of one array, as it handles being closed while pending."""
  try:
    await _suspend()
  except BaseException as e:
    raise Exception('Encountered error while reading array index') from e


def test_only_what_an_aborted_restore_leaves_is_dropped():
  """Late callbacks to its closed loop and its pending reads, nothing else."""
  printed = []
  hook = programs._drop_closed_loop_callbacks(printed.append)  # noqa: SLF001
  closed = types.SimpleNamespace(
    exc_type=RuntimeError,
    exc_value=RuntimeError('Event loop is closed'),
    object=None,
  )
  other = types.SimpleNamespace(
    exc_type=RuntimeError,
    exc_value=RuntimeError('something else'),
    object=None,
  )
  hook(closed)
  hook(other)
  # A pending read collected: Python closes it, and it raises.
  previous, sys.unraisablehook = sys.unraisablehook, hook
  try:
    pending = _read_array_index_and_device_put()
    pending.send(None)  # suspended
    del pending
    gc.collect()
  finally:
    sys.unraisablehook = previous
  assert printed == [other]
  # The same coroutine failing for another reason is printed.
  failed = types.SimpleNamespace(
    exc_type=Exception,
    exc_value=Exception('read failed'),
    object=_read_array_index_and_device_put(),
  )
  hook(failed)
  failed.object.close()
  assert printed == [other, failed]


def test_a_vocabulary_that_does_not_fit_is_named(copy):
  words = vocab_lib.Vocab.load(copy / 'vocab.json').words[4:]
  vocab_lib.Vocab(words + ['extra']).save(copy / 'vocab.json')
  with pytest.raises(
    checkpoints.DamagedCheckpointError,
    match=r"does not fit .*\['embedding'\]\['embedding'\] "
    r'is \(\d+, 16\) float32, expected',
  ):
    inference.load_trained(copy)


def test_no_step_at_all_and_an_unknown_step(copy):
  with pytest.raises(errors.MissingFileError, match='holds steps 4, 8'):
    inference.load_trained(copy, step=5)
  shutil.rmtree(copy / 'checkpoints')
  with pytest.raises(errors.MissingFileError, match='no checkpoint in'):
    inference.load_trained(copy)


def test_training_resumes_from_the_newest_good_step(
  copy, trained, shapes_dir, caplog
):
  damaged = _largest_file(copy, _STEPS)
  _truncate(damaged)
  in_step = damaged.relative_to(copy / 'checkpoints' / str(_STEPS))
  damaged_size = damaged.stat().st_size
  config = testing_lib.tiny_config(shapes_dir, num_train_steps=_STEPS)
  with caplog.at_level('WARNING'):
    state = loop.train_and_evaluate(config, str(copy))
  assert f'checkpoint step {_STEPS} cannot be restored' in caplog.text
  # The damaged step is kept, moved aside; training redid steps 5 to 8
  # exactly as the first time.
  moved = copy / damage.DAMAGED_DIR / str(_STEPS)
  assert (moved / in_step).stat().st_size == damaged_size
  testing_lib.leaves_equal(state.params, checkpoints.restore_params(trained)[1])


def _damage_each_file(
  workdir: pathlib.Path, tmp_path: pathlib.Path, damage
) -> tuple[list[str], list[int]]:
  """Damages each file of the newest step in turn.

  Returns:
    What inference then did with each copy, and the step training would
    resume from.
  """
  manager = checkpoints.manager(workdir, read_only=True)
  target = checkpoints.abstract_tree(
    manager.item_metadata(_STEPS),
    jax.sharding.SingleDeviceSharding(jax.local_devices()[0]),
  )
  manager.close()
  outcomes, resumed = [], []
  for k, path in enumerate(_data_files(workdir, _STEPS)):
    copy = tmp_path / f'copy{k}'
    shutil.copytree(workdir, copy)
    damage(copy / path.relative_to(workdir))
    try:
      outcomes.append(f'loaded step {inference.load_trained(copy).step}')
    except errors.UserError as e:
      assert '\n' not in str(e), str(e)
      outcomes.append(type(e).__name__)
    resumed.append(checkpoints.restore_newest(copy, target)[0])
    shutil.rmtree(copy)
  return outcomes, resumed


def _flip_bits(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  rng = np.random.default_rng(len(data))
  for i in rng.integers(0, len(data), size=max(1, len(data) // 64)):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize(
  'damage', [_truncate, _flip_bits], ids=['truncated', 'bit flips']
)
def test_every_damaged_file_loads_or_gives_one_line_and_training_resumes(
  trained, tmp_path, damage
):
  outcomes, resumed = _damage_each_file(trained, tmp_path, damage)
  assert len(outcomes) >= 5
  assert set(resumed) <= {4, _STEPS} and 4 in resumed
  assert set(outcomes) <= {f'loaded step {_STEPS}', 'DamagedCheckpointError'}
  assert 'DamagedCheckpointError' in outcomes


def _checkpoint_names(workdir: pathlib.Path) -> set[str]:
  try:
    return set(os.listdir(workdir / 'checkpoints'))
  except FileNotFoundError:
    return set()


def _writing(names: set[str]) -> bool:
  """Whether a step is being written (Orbax renames it once it is whole)."""
  return any('tmp' in name for name in names)


def _wait_until(
  process: subprocess.Popen, workdir: pathlib.Path, moment
) -> None:
  """Polls the workdir's checkpoints until `moment(names)` or the process ends.

  Every millisecond: a save lasts about 200.
  """
  deadline = time.monotonic() + 30
  while (
    not moment(_checkpoint_names(workdir))
    and process.poll() is None
    and time.monotonic() < deadline
  ):
    time.sleep(0.001)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_is_bit_exact(
  tmp_path, shapes_dir, compilation_cache
):
  # A checkpoint every 5 steps (a save takes about as long as 5 steps
  # here), so that a kill lands while one is written, or just before or
  # after. The kills take turns: at a random moment; at a random moment of
  # a step's write; just as a step is committed (when Orbax deletes the
  # oldest one, keep_checkpoints=2).
  steps = 300
  fields = dict(
    num_train_steps=steps,
    eval_every_steps=steps,
    keep_checkpoints=2,
    num_caption_eval_images=0,
  )
  config = testing_lib.tiny_config(
    shapes_dir, checkpoint_every_steps=5, log_every_steps=5, **fields
  )
  uninterrupted = loop.train_and_evaluate(
    testing_lib.tiny_config(
      shapes_dir,
      num_train_steps=steps,
      checkpoint_every_steps=steps,
      eval_every_steps=steps,
      log_every_steps=100,
      num_caption_eval_images=0,
    ),
    str(tmp_path / 'uninterrupted'),
  )
  # The killed processes share the compiled programs of the uninterrupted
  # run: each starts in seconds.
  env = serving.compilation_cache_env(compilation_cache)
  workdir = tmp_path / 'killed'
  rng = np.random.default_rng(0)
  kills = killed_while_writing = 0
  for trial in range(9):
    process = testing_lib.start_train(workdir, config, env=env)
    # Once steps run (and save), a random moment within the next 0.5 s
    # (two saves), then the moment of the trial's kind.
    if testing_lib.wait_for_line(process, f'/{steps} | loss') is None:
      break  # it finished
    time.sleep(rng.uniform(0.0, 0.5))
    if trial % 3 == 1:  # during a write: a save lasts about 0.2 s
      _wait_until(process, workdir, _writing)
      time.sleep(rng.uniform(0.0, 0.1))
    elif trial % 3 == 2:  # just as a new step is committed
      committed = {n for n in _checkpoint_names(workdir) if n.isdigit()}
      _wait_until(
        process,
        workdir,
        lambda names, committed=committed: bool(
          {n for n in names if n.isdigit()} - committed
        ),
      )
    process.kill()
    process.wait()
    kills += 1
    killed_while_writing += _writing(_checkpoint_names(workdir))
  assert kills == 9
  # Some kills left a step half written.
  assert killed_while_writing >= 1
  steps_done = checkpoints.restore_params(workdir)[0]
  assert 0 < steps_done < steps
  # How often the resumed run saves does not change what it computes (the
  # uninterrupted run saved once): it saves once too.
  result = testing_lib.run_train(
    workdir,
    testing_lib.tiny_config(
      shapes_dir, checkpoint_every_steps=steps, log_every_steps=100, **fields
    ),
    env=env,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  testing_lib.leaves_equal(
    checkpoints.restore_params(workdir)[1], uninterrupted.params
  )


def _read_json(path: pathlib.Path):
  return json.loads(path.read_text())


def test_a_reason_is_the_innermost_error_in_words_naming_its_file(tmp_path):
  tensorstore = ValueError(
    'OUT_OF_RANGE: Error opening "zarr" driver: Error reading Byte range '
    '[0, 8) of local file "/w/d/ab": Requested byte range [0, 8) is not '
    'valid for value of size 4 [tensorstore_spec=\'{"driver":"zarr"}\']'
  )
  try:
    try:
      raise tensorstore
    except ValueError as e:
      raise Exception(  # noqa: TRY002 - what Orbax raises
        'Encountered error while reading array index. See full TensorStore '
        'details: <bound method spec of TensorStore({\n  ...\n})>.'
      ) from e
  except Exception as e:  # noqa: BLE001
    wrapped = e
  assert damage.reason(wrapped) == (
    'a file is cut short: Error reading Byte range [0, 8) of local file '
    '"/w/d/ab": Requested byte range [0, 8) is not valid for value of size 4'
  )
  metadata = tmp_path / '_METADATA'
  metadata.write_text('{"tree": ')
  try:
    _read_json(metadata)
  except json.JSONDecodeError as e:
    cut = e
  assert damage.reason(cut) == (
    f'file "{metadata}" is not valid JSON: Expecting value: line 1 column 10 '
    '(char 9)'
  )


def test_only_asyncio_reports_of_abandoned_reads_are_dropped():
  keep = programs._NoAbandonedRestoreTasks()  # noqa: SLF001
  record = lambda message: logging.LogRecord(
    'asyncio', logging.ERROR, 'base_events.py', 1, message, None, None
  )
  abandoned = [
    'Task exception was never retrieved\nfuture: <Task finished '
    "coro=<async_deserialize() done> exception=ValueError('...')>",
    'Future exception was never retrieved\nfuture: <Future finished '
    "exception=ValueError('OUT_OF_RANGE: ... [tensorstore_spec=...]')>",
  ]
  other = [
    'Future exception was never retrieved\nfuture: <Future finished '
    "exception=ValueError('something else')>",
    'Task was destroyed but it is pending!',
  ]
  assert [keep.filter(record(m)) for m in abandoned + other] == [
    False,
    False,
    True,
    True,
  ]
