"""Training: optimizer, resume, signals, failures and data parallelism."""

import functools
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax import files
from capjax import workdir as workdir_lib
from capjax.configs import default
from capjax.data import feature_store
from capjax.model import captioner
from capjax.testing import serving
from capjax.testing import training as testing_lib
from capjax.training import checkpoints
from capjax.training import loop
from capjax.training import state as state_lib
from capjax.training import step as step_lib

# Runs of the training loop share their compiled steps.
pytestmark = pytest.mark.usefixtures('compilation_cache')


@pytest.fixture(scope='module')
def shapes_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('shapes')


def _trained(tmp_path_factory, shapes_dir, **overrides):
  workdir = tmp_path_factory.mktemp('trained') / 'run'
  state = loop.train_and_evaluate(
    testing_lib.tiny_config(shapes_dir, **overrides), str(workdir)
  )
  return workdir, state


@pytest.fixture(scope='module')
def straight(tmp_path_factory, shapes_dir):
  """(workdir, final state) of `tiny_config` trained straight through.

  Tests must not change the workdir.
  """
  return _trained(tmp_path_factory, shapes_dir)


@pytest.fixture(scope='module')
def one_device(tmp_path_factory, shapes_dir):
  """(workdir, final state) of 8 steps on one device; not to be changed."""
  return _trained(tmp_path_factory, shapes_dir, num_train_steps=8)


def test_optimizer_schedule_and_clipping():
  config = default.get_config()
  config.schedule = 'warmup_cosine'
  config.warmup_steps = 10
  config.num_train_steps = 110
  config.grad_clip_norm = 1.0
  tx = state_lib.make_optimizer(config)
  params = {'w': jnp.zeros(3)}
  state = tx.init(params)
  # Warmup starts at 0: the first update is zero whatever the gradient.
  updates, state = tx.update({'w': jnp.array([100.0, 0.0, 0.0])}, state, params)
  np.testing.assert_array_equal(updates['w'], 0.0)


def test_optimizer_state_layout_does_not_depend_on_schedule_or_clipping():
  # So a run can resume after switching clipping on (as the NaN error advises).
  params = {'w': jnp.zeros(3)}
  structures = set()
  for schedule, clip in [
    ('constant', 0.0),
    ('constant', 5.0),
    ('warmup_cosine', 0.0),
    ('warmup_cosine', 1.0),
  ]:
    config = default.get_config()
    config.schedule, config.grad_clip_norm = schedule, clip
    state = state_lib.make_optimizer(config).init(params)
    structures.add(jax.tree_util.tree_structure(state))
  assert len(structures) == 1


def test_train_step_lowers_the_loss_on_a_fixed_batch():
  config = testing_lib.tiny_config(pathlib.Path('unused'), learning_rate=1e-2)
  model = captioner.from_config(config, vocab_size=20)
  tx = state_lib.make_optimizer(config)
  state = state_lib.create_train_state(model, tx, (5, 7), seed=0)
  rng = np.random.default_rng(0)
  batch = {
    'features': jnp.asarray(rng.normal(size=(4, 5, 7)), jnp.float32),
    'tokens': jnp.array([[1, 5, 6, 2, 0]] * 4, jnp.int32),
  }
  step = jax.jit(
    functools.partial(
      step_lib.train_step, model=model, tx=tx, attention_penalty=0.1
    )
  )
  state, first = step(state, batch)
  for _ in range(30):
    state, metrics = step(state, batch)
  assert int(state.step) == 31
  assert float(metrics['token_count']) == 12  # 3 targets per caption
  mean_loss = lambda m: float(m['loss_sum']) / float(m['token_count'])
  assert mean_loss(metrics) < 0.1 * mean_loss(first)
  assert float(metrics['objective']) > mean_loss(metrics)  # plus the penalty


def test_training_writes_a_self_describing_workdir(straight):
  workdir, state = straight
  assert int(state.step) == 12
  for name in (
    'config.json',
    'vocab.json',
    'features.json',
    'metrics.jsonl',
    'loss.png',
  ):
    assert (workdir / name).is_file(), name
  assert list((workdir / 'tensorboard').iterdir())
  assert len(list((workdir / 'examples').glob('*.png'))) == 4
  manager = checkpoints.manager(workdir, read_only=True)
  assert manager.all_steps() == [4, 8, 12]
  testing_lib.leaves_equal(checkpoints.restore_params(workdir)[1], state.params)
  saved = workdir_lib.load_config(workdir)
  assert saved.units == 24 and saved.num_train_steps == 12
  info = files.read_json(workdir / 'features.json')
  assert (info['num_locations'], info['feature_dim']) == (16, 16 * 16 * 3 + 16)


def test_resume_is_exact(tmp_path, shapes_dir, straight):
  config = testing_lib.tiny_config(shapes_dir)
  _, straight = straight
  stopped = testing_lib.tiny_config(shapes_dir, num_train_steps=5)
  assert (
    int(loop.train_and_evaluate(stopped, str(tmp_path / 'resumed')).step) == 5
  )
  # Restarts from the checkpoint at step 5, mid-epoch (6 steps per epoch).
  resumed = loop.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert int(resumed.step) == 12
  testing_lib.leaves_equal(resumed.params, straight.params)
  testing_lib.leaves_equal(resumed.opt_state, straight.opt_state)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
  tmp_path, shapes_dir, monkeypatch
):
  original = step_lib.train_step

  def poisoned_after_step_6(state, batch, **kwargs):
    state, metrics = original(state, batch, **kwargs)
    poison = jnp.where(state.step >= 7, jnp.nan, 1.0)
    params = jax.tree_util.tree_map(lambda p: p * poison, state.params)
    metrics = dict(metrics, objective=metrics['objective'] * poison)
    return state.replace(params=params), metrics

  monkeypatch.setattr(step_lib, 'train_step', poisoned_after_step_6)
  workdir = tmp_path / 'nan'
  with pytest.raises(
    loop.NonFiniteLossError,
    match=r'non-finite at step 7; the last good checkpoint is step 4',
  ):
    loop.train_and_evaluate(testing_lib.tiny_config(shapes_dir), str(workdir))
  assert checkpoints.manager(workdir, read_only=True).all_steps() == [4]
  params = checkpoints.restore_params(workdir)[1]
  assert all(np.isfinite(p).all() for p in jax.tree_util.tree_leaves(params))


def test_resuming_under_an_incompatible_config_is_refused(tmp_path, shapes_dir):
  workdir = str(tmp_path / 'run')
  loop.train_and_evaluate(
    testing_lib.tiny_config(shapes_dir, num_train_steps=4), workdir
  )
  with pytest.raises(ValueError, match=r'units: 24 -> 32'):
    loop.train_and_evaluate(
      testing_lib.tiny_config(shapes_dir, units=32), workdir
    )


def test_features_that_do_not_match_the_model_are_refused(tmp_path, shapes_dir):
  workdir = tmp_path / 'run'
  loop.train_and_evaluate(
    testing_lib.tiny_config(shapes_dir, num_train_steps=4), str(workdir)
  )
  # The same images, with features of another size from another extractor.
  store = feature_store.FeatureStore.open_split(
    str(workdir / 'features'), 'train'
  )
  other = tmp_path / 'other'
  for split in ('train', 'val'):
    ids = feature_store.FeatureStore.open_split(
      str(workdir / 'features'), split
    ).image_ids
    feature_store.write_feature_store(
      feature_store.store_dir(str(other), split),
      np.zeros((len(ids), store.num_locations, 32), np.float16),
      ids,
      {'name': 'custom'},
    )
  config = testing_lib.tiny_config(
    shapes_dir, num_train_steps=8, feature_dir=str(other)
  )
  with pytest.raises(
    ValueError, match=r"do not match those of this workdir's model"
  ):
    loop.train_and_evaluate(config, str(workdir))


def test_features_of_another_extractor_setting_are_refused(
  tmp_path, shapes_dir
):
  feature_dir = str(tmp_path / 'features')
  loop.train_and_evaluate(
    testing_lib.tiny_config(
      shapes_dir, num_train_steps=2, feature_dir=feature_dir
    ),
    str(tmp_path / 'grid4'),
  )
  # A new run pointed at the same store with another grid must not train on it.
  config = testing_lib.tiny_config(
    shapes_dir, num_train_steps=2, feature_dir=feature_dir, patch_grid=2
  )
  with pytest.raises(
    ValueError,
    match=r"config asks for \{'name': 'patches', "
    r"'patch_grid': 2\}",
  ):
    loop.train_and_evaluate(config, str(tmp_path / 'grid2'))


def test_missing_features_are_a_clear_error(tmp_path, shared_data):
  config = testing_lib.tiny_config(
    tmp_path, dataset='coco_json', data_dir=str(shared_data / 'coco-mini')
  )
  with pytest.raises(ValueError, match=r'python -m capjax.features'):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))


@pytest.mark.parametrize(
  'overrides, message',
  [
    (dict(batch_size=0), 'config.batch_size must be positive'),
    (dict(log_every_steps=0), 'config.log_every_steps must be positive'),
    (
      dict(bucket_lengths=(8, 16)),
      'largest is at least config.max_caption_len',
    ),
    (dict(dropout_rate=1.0), 'config.dropout_rate'),
  ],
)
def test_impossible_configs_are_refused_up_front(tmp_path, overrides, message):
  config = testing_lib.tiny_config(tmp_path / 'shapes', **overrides)
  with pytest.raises(ValueError, match=message):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'shapes').exists()  # before any data is made


def test_batch_that_does_not_divide_over_devices_is_refused(
  tmp_path, shapes_dir
):
  config = testing_lib.tiny_config(shapes_dir, batch_size=6)
  result = testing_lib.run_train(
    tmp_path / 'run',
    config,
    env={'XLA_FLAGS': '--xla_force_host_platform_device_count=4'},
  )
  assert result.returncode == 1
  assert 'batch size 6 does not divide over 4 devices' in result.stderr
  assert 'Traceback' not in result.stderr


def test_a_boolean_flag_given_a_separate_value_is_refused(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'capjax.train',
      f'--workdir={tmp_path / "run"}',
      '--config.group_by_length',
      'false',
    ],
    capture_output=True,
    text=True,
    cwd=testing_lib.REPO_ROOT,
    timeout=120,
  )
  assert result.returncode == 1
  assert 'unexpected arguments: false' in result.stderr
  assert '--config.group_by_length=false' in result.stderr
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_four_devices_match_one(tmp_path, shapes_dir, one_device):
  config = testing_lib.tiny_config(shapes_dir, num_train_steps=8)
  _, one = one_device
  result = testing_lib.run_train(
    tmp_path / 'four',
    config,
    env={'XLA_FLAGS': '--xla_force_host_platform_device_count=4'},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'on 4 device(s)' in result.stderr
  testing_lib.leaves_equal(
    checkpoints.restore_params(tmp_path / 'four')[1], one.params, atol=2e-5
  )


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, shapes_dir, one_device):
  config = testing_lib.tiny_config(shapes_dir, num_train_steps=8)
  one_dir, one = one_device
  address = f'127.0.0.1:{_free_port()}'
  env = dict(
    os.environ, JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo', JAX_PLATFORMS='cpu'
  )
  processes = [
    subprocess.Popen(
      [
        sys.executable,
        '-m',
        'capjax.train',
        f'--workdir={tmp_path / "two"}',
        *testing_lib.config_flags(config),
        f'--coordinator_address={address}',
        '--num_processes=2',
        f'--process_id={i}',
      ],
      env=env,
      cwd=testing_lib.REPO_ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-3000:]
  assert '4 local example(s) per process' in outputs[0]
  testing_lib.leaves_equal(
    checkpoints.restore_params(tmp_path / 'two')[1], one.params, atol=2e-5
  )
  # Only process 0 computes the caption metrics; both agree on the best.
  assert (
    checkpoints.read_best(tmp_path / 'two').step
    == checkpoints.read_best(one_dir).step
  )


@pytest.mark.slow
def test_sigterm_saves_and_the_rerun_resumes(tmp_path, shapes_dir):
  config = testing_lib.tiny_config(
    shapes_dir,
    num_train_steps=100_000,
    checkpoint_every_steps=100_000,
    log_every_steps=1,
    eval_every_steps=100_000,
  )
  workdir = tmp_path / 'run'
  # The rerun loads the first run's compiled train step.
  cache = serving.compilation_cache_env(tmp_path / 'compilation_cache')
  process = subprocess.Popen(
    [
      sys.executable,
      '-m',
      'capjax.train',
      f'--workdir={workdir}',
      *testing_lib.config_flags(config),
    ],
    env=dict(os.environ, **cache),
    cwd=testing_lib.REPO_ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  lines = []
  for line in process.stdout:
    lines.append(line)
    if re.search(r'step 20/100000', line):
      process.send_signal(signal.SIGTERM)
      break
  output = ''.join(lines) + process.communicate(timeout=120)[0]
  assert process.returncode == 0, output[-3000:]
  match = re.search(r'SIGTERM: saved the checkpoint of step (\d+)', output)
  assert match, output[-3000:]
  saved = int(match.group(1))
  assert saved >= 20
  assert checkpoints.manager(workdir, read_only=True).all_steps() == [saved]

  config.num_train_steps = saved + 2
  result = testing_lib.run_train(workdir, config, env=cache)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'resuming from the checkpoint of step {saved}' in result.stderr
  assert f'step {saved + 2}/{saved + 2}' in result.stderr


# Runs capjax.train with one library function replaced by one that fails on
# process 0 only.
_FAIL_ON_PROCESS_0 = """
import importlib, runpy, sys, jax
from capjax import errors
target = importlib.import_module('capjax.{module}')
original = target.{function}
def fail_on_process_0(*args, **kwargs):
  if jax.process_index() == 0:
    raise errors.UserError('injected failure')
  return original(*args, **kwargs)
target.{function} = fail_on_process_0
sys.argv = ['capjax.train'] + sys.argv[1:]
runpy.run_module('capjax.train', run_name='__main__', alter_sys=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
  'module, function, activity',
  [
    ('training.loop', 'prepare_data', 'preparing the data'),
    ('captioning', 'caption_metrics', 'computing the caption metrics'),
  ],
)
def test_a_failure_on_process_0_stops_every_process(
  tmp_path, shapes_dir, module, function, activity
):
  config = testing_lib.tiny_config(
    shapes_dir, num_train_steps=8, num_caption_eval_images=4
  )
  address = f'127.0.0.1:{_free_port()}'
  env = dict(
    os.environ, JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo', JAX_PLATFORMS='cpu'
  )
  code = _FAIL_ON_PROCESS_0.format(module=module, function=function)
  processes = [
    subprocess.Popen(
      [
        sys.executable,
        '-c',
        code,
        f'--workdir={tmp_path / "run"}',
        *testing_lib.config_flags(config),
        f'--coordinator_address={address}',
        '--num_processes=2',
        f'--process_id={i}',
      ],
      env=env,
      cwd=testing_lib.REPO_ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=120)[0] for p in processes]
  assert [p.returncode for p in processes] == [1, 1], outputs
  assert 'error: injected failure' in outputs[0]
  assert f'error: process 0 failed while {activity}' in outputs[1]
  assert not any('Traceback' in out for out in outputs)
