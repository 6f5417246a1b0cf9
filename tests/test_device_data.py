"""Batches gathered on the devices (config.device_data) and several steps per
jitted call (config.steps_per_dispatch) train exactly as the host path does."""

import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from capjax import config_checks
from capjax import errors
from capjax.data import input_pipeline
from capjax.data import reference_batches
from capjax.model import captioner
from capjax.testing import serving
from capjax.testing import training as testing_lib
from capjax.training import checkpoints
from capjax.training import device_data
from capjax.training import dispatch
from capjax.training import loop
from capjax.training import objectives
from capjax.training import parallel
from capjax.training import state as state_lib

pytestmark = pytest.mark.usefixtures('compilation_cache')

FOUR_DEVICES = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
GB = 10**9
# 1000 grids of 10 MB and 0.1 GB of tokens: 10.1 GB a replica, 2.6 GB a
# quarter shard.
TABLES = device_data.Tables(
  grid_rows=(1000,), grid_row_bytes=10**7, small_bytes=GB // 10
)


@pytest.fixture(scope='module')
def shapes_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('shapes')


def _config(shapes_dir, **overrides):
  fields = dict(
    num_train_steps=8,
    log_every_steps=4,
    eval_every_steps=4,
    checkpoint_every_steps=4,
    num_caption_eval_images=0,
  )
  return testing_lib.tiny_config(shapes_dir, **{**fields, **overrides})


@pytest.fixture(scope='module')
def host_run(tmp_path_factory, shapes_dir):
  """The final state of 8 steps on the host path, one step per call."""
  workdir = tmp_path_factory.mktemp('host') / 'run'
  return loop.train_and_evaluate(
    _config(shapes_dir, device_data='off'), str(workdir)
  )


@pytest.mark.parametrize(
  'mode, layout, free_gb, devices, expected',
  [
    ('auto', 'auto', 30, 4, 'replicated'),  # 10.1 <= 15
    ('auto', 'auto', 10, 4, 'sharded'),  # 10.1 > 5 >= 2.6
    ('auto', 'auto', 4, 4, 'host'),  # 2.6 > 2
    ('auto', 'auto', 15, 1, 'host'),  # one device: no shard to fall back on
    ('on', 'auto', 4, 4, 'sharded'),  # 'on' may fill the free memory
    ('on', 'replicated', 11, 4, 'replicated'),
    ('off', 'auto', 1000, 4, 'host'),
  ],
)
def test_the_layout_is_chosen_by_the_free_memory(
  mode, layout, free_gb, devices, expected
):
  choice = device_data.choose(
    mode, layout, TABLES, devices, free_gb * GB, 'test'
  )
  assert (choice.layout if choice.on else 'host') == expected, choice.reason
  if mode == 'auto' and not choice.on:
    assert 'GB free per device' in choice.reason


@pytest.mark.parametrize(
  'layout, free_gb, devices',
  [('auto', 2, 4), ('auto', 10, 1), ('replicated', 8, 4)],
)
def test_on_refuses_data_that_fits_no_device_in_one_line(
  layout, free_gb, devices
):
  with pytest.raises(errors.UserError) as raised:
    device_data.choose('on', layout, TABLES, devices, free_gb * GB, 'test')
  message = str(raised.value)
  assert '\n' not in message
  assert f'{free_gb:.2f} GB free per device' in message
  assert '10.10 GB replicated' in message


@pytest.mark.parametrize(
  'overrides, message',
  [
    (dict(device_data='yes'), 'config.device_data must be one of auto'),
    (dict(device_data_layout='x'), 'config.device_data_layout must be'),
    (dict(steps_per_dispatch=0), 'steps_per_dispatch must be positive'),
    (
      dict(steps_per_dispatch=3),
      r'steps_per_dispatch \(3\) must divide config.log_every_steps \(4\)',
    ),
    (
      dict(steps_per_dispatch=2, eval_every_steps=3),
      r'must divide config.eval_every_steps \(3\)',
    ),
  ],
)
def test_impossible_dispatch_configs_are_refused(
  shapes_dir, overrides, message
):
  with pytest.raises(errors.UserError, match=message):
    config_checks.check_config(_config(shapes_dir, **overrides))


def test_only_k_steps_of_one_length_are_scanned():
  # From step 1 with k = 4: steps 1-3 up to the first boundary, 4-7 mix
  # two lengths, 8-11 scan, 12-13 are the last, short dispatch.
  keys = [24, 24, 24, 24, 48, 24, 24, 24, 24, 24, 24, 24, 24, 24]
  items = iter(({'ids': np.full(2, s)}, keys[s]) for s in range(1, 14))
  got = [
    (u.first, u.stop, u.inputs['ids'].shape)
    for u in dispatch.units(items, 1, 14, 4)
  ]
  singles = lambda steps: [(s, s + 1, (2,)) for s in steps]
  assert got == [
    *singles(range(1, 8)),
    (8, 12, (4, 2)),
    *singles(range(12, 14)),
  ]


def _built(shapes_dir, tmp_path, config):
  data = loop.prepare_data(config, tmp_path, write_files=False)
  model = captioner.from_config(config, data.vocab.size)
  tx = state_lib.make_optimizer(config)
  mesh = parallel.make_mesh()
  return (
    data,
    *objectives.build(
      config, data, model, tx, mesh, dict(process_index=0, process_count=1)
    ),
    mesh,
  )


def _same_bits(device, host):
  device = np.asarray(device)
  assert device.dtype == host.dtype and device.shape == host.shape
  np.testing.assert_array_equal(
    device.view(f'u{device.itemsize}'), host.view(f'u{host.itemsize}')
  )


@pytest.mark.parametrize('layout', ['replicated', 'sharded'])
def test_device_batches_are_the_host_pipelines(shapes_dir, tmp_path, layout):
  # 13 evaluation examples: the second batch has 3 padding rows.
  config = _config(
    shapes_dir,
    device_data='on',
    device_data_layout=layout,
    num_eval_examples=13,
  )
  data, objective, evaluator, mesh = _built(shapes_dir, tmp_path, config)
  assert objective.choice.layout == layout
  host = input_pipeline.train_batches(
    config, data.train_store, data.train_records, data.vocab
  )
  gather = jax.jit(objective.gather, static_argnums=2)
  # Steps 0 to 7 cross an epoch (6 steps).
  for step, (inputs, length) in zip(range(8), objective.items(0)):
    inputs = parallel.global_batch(inputs, mesh)
    batch = gather(inputs, objective.constants, length)
    for name, value in host.batch(step).items():
      _same_bits(batch[name], value)
  eval_host = input_pipeline.EvalBatches(
    input_pipeline.make_examples(
      data.eval_store, data.eval_records, data.vocab, config.max_caption_len
    ),
    batch_size=config.batch_size,
    bucket_lengths=config.bucket_lengths,
    num_examples=config.num_eval_examples,
  )
  eval_gather = jax.jit(evaluator.gather, static_argnums=2)
  for index in range(eval_host.num_batches):
    ids, length = evaluator.global_ids(index)
    batch = eval_gather(ids, evaluator.constants, length)
    for name in ('features', 'tokens'):
      _same_bits(batch[name], eval_host.batch(index)[name])
  # SCST's batches: images with all their references.
  config.objective = 'scst'
  _, objective, _, _ = _built(shapes_dir, tmp_path, config)
  host = reference_batches.ImageBatches(
    reference_batches.image_references(
      input_pipeline.make_examples(
        data.train_store,
        data.train_records,
        data.vocab,
        config.max_caption_len,
      )
    ),
    batch_size=config.batch_size,
    seed=config.seed,
  )
  gather = jax.jit(objective.gather, static_argnums=2)
  for step, (inputs, key) in zip(range(8), objective.items(0)):
    batch = gather(
      parallel.global_batch(inputs, mesh), objective.constants, key
    )
    for name, value in host.batch(step).items():
      _same_bits(batch[name], value)


def test_device_batches_on_four_devices():
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'pytest',
      __file__,
      '-q',
      '-p',
      'no:cacheprovider',
      '-k',
      'test_device_batches_are_the_host_pipelines',
    ],
    env=dict(os.environ, **FOUR_DEVICES),
    capture_output=True,
    text=True,
    cwd=testing_lib.REPO_ROOT,
    check=False,
  )
  assert result.returncode == 0, result.stdout[-3000:]
  assert '2 passed' in result.stdout


@pytest.mark.parametrize('k', [1, 4])
def test_training_on_the_device_is_bit_identical(
  tmp_path, shapes_dir, host_run, k, caplog
):
  caplog.set_level(logging.INFO)
  state = loop.train_and_evaluate(
    _config(shapes_dir, device_data='on', steps_per_dispatch=k),
    str(tmp_path / 'run'),
  )
  testing_lib.leaves_equal(state.params, host_run.params)
  testing_lib.leaves_equal(state.opt_state, host_run.opt_state)
  assert 'batches gathered on the devices, replicated' in caplog.text
  assert ('scanned 4 times' in caplog.text) == (k == 4)


def test_data_that_cannot_fit_is_refused_before_compiling(
  tmp_path, shapes_dir, monkeypatch
):
  monkeypatch.setattr(device_data, 'free_memory', lambda: (1000, 'test'))
  workdir = tmp_path / 'run'
  with pytest.raises(errors.UserError, match='does not fit: it needs 0.0'):
    loop.train_and_evaluate(_config(shapes_dir, device_data='on'), str(workdir))
  # Nothing was restored, initialised or saved.
  assert not (workdir / 'checkpoints').exists()


def test_auto_says_which_path_and_why(tmp_path, shapes_dir, caplog):
  caplog.set_level(logging.INFO)
  loop.train_and_evaluate(
    _config(shapes_dir, num_train_steps=1, device_data='auto'),
    str(tmp_path / 'run'),
  )
  assert (
    'device_data=auto: batches gathered on the devices, replicated, because '
    'the replicated data takes' in caplog.text
  )
  assert 'free per device (the host memory available' in caplog.text


# --- 200 steps, 4 devices, kill -9 -----------------------------------------

STEPS = 200


def _long_config(shapes_dir):
  return _config(
    shapes_dir,
    num_train_steps=STEPS,
    log_every_steps=4,
    eval_every_steps=100,
    checkpoint_every_steps=4,
  )


@pytest.fixture(scope='module')
def host_200(tmp_path_factory, shapes_dir):
  workdir = tmp_path_factory.mktemp('host_200') / 'run'
  return loop.train_and_evaluate(
    _config(
      shapes_dir,
      num_train_steps=STEPS,
      eval_every_steps=100,
      checkpoint_every_steps=100,
      device_data='off',
    ),
    str(workdir),
  )


@pytest.mark.slow
def test_200_steps_on_the_device_four_per_call(tmp_path, shapes_dir, host_200):
  state = loop.train_and_evaluate(
    _config(
      shapes_dir,
      num_train_steps=STEPS,
      eval_every_steps=100,
      checkpoint_every_steps=100,
      device_data='on',
      steps_per_dispatch=4,
    ),
    str(tmp_path / 'run'),
  )
  testing_lib.leaves_equal(state.params, host_200.params)


@pytest.mark.slow
def test_200_steps_on_four_devices_in_each_layout(tmp_path, shapes_dir):
  config = _long_config(shapes_dir)
  params = {}
  for name, extra in {
    'host': ['--config.device_data=off'],
    'replicated': [
      '--config.device_data=on',
      '--config.device_data_layout=replicated',
    ],
    'sharded': [
      '--config.device_data=on',
      '--config.device_data_layout=sharded',
      '--config.steps_per_dispatch=4',
    ],
  }.items():
    result = testing_lib.run_train(
      tmp_path / name, config, env=FOUR_DEVICES, extra=extra
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'on 4 device(s)' in result.stderr
    params[name] = checkpoints.restore_params(tmp_path / name)[1]
  testing_lib.leaves_equal(params['replicated'], params['host'])
  testing_lib.leaves_equal(params['sharded'], params['host'])


@pytest.mark.slow
def test_kill_9_four_per_call_then_resume_one_per_call(
  tmp_path, shapes_dir, host_200, compilation_cache
):
  config = _long_config(shapes_dir)
  workdir = tmp_path / 'run'
  env = serving.compilation_cache_env(compilation_cache)
  process = testing_lib.start_train(
    workdir,
    config,
    env=env,
    extra=['--config.device_data=on', '--config.steps_per_dispatch=4'],
  )
  assert testing_lib.wait_for_line(process, f'step 12/{STEPS}') is not None
  process.kill()
  process.wait()
  done = checkpoints.manager(workdir, read_only=True).latest_step()
  assert done is not None and done < STEPS
  result = testing_lib.run_train(
    workdir, config, env=env, extra=['--config.device_data=on']
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'resuming from the checkpoint of step {done}' in result.stderr
  testing_lib.leaves_equal(
    checkpoints.restore_params(workdir)[1], host_200.params
  )
