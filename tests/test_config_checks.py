"""Configs and workdir files: unknown fields, wrong types, bad JSON, named."""

import json
import shutil
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import pytest

from capjax import config_checks
from capjax import errors
from capjax import inference
from capjax.configs import default
from capjax.data import datasets
from capjax.model import captioner
from capjax.testing import training as testing_lib
from capjax.training import loop
from capjax.training import state as state_lib

# The string fields that are not a choice: paths, and splits (whose names
# depend on the data set, checked by config_checks.split_names).
_FREE_STRINGS = {
  'data_dir',
  'train_split',
  'eval_split',
  'feature_dir',
  'extractor_weights',
  'init_from',
}


@pytest.fixture
def workdir(trained_workdir, tmp_path):
  copy = tmp_path / 'run'
  shutil.copytree(trained_workdir, copy)
  return copy


def _edit_config(workdir, **fields):
  path = workdir / 'config.json'
  values = json.loads(path.read_text())
  values.update(fields)
  path.write_text(json.dumps(values))


def test_the_default_config_and_a_saved_one_pass():
  config = default.get_config()
  config_checks.check_config(config)
  saved = json.loads(config.to_json())
  assert config_checks.from_values(saved, 'config.json') == config


@pytest.mark.parametrize(
  'values, message',
  [
    ({'batch_sise': 64}, "config.json: unknown config field 'batch_sise'"),
    ({'shapes': {'sead': 1}}, "unknown config field 'shapes.sead'"),
    ({'batch_size': '64'}, "config.batch_size must be an integer, got '64'"),
    ({'carry_gru_state': 1}, 'config.carry_gru_state must be true or false'),
    ({'learning_rate': True}, 'config.learning_rate must be a number'),
    ({'bucket_lengths': 48}, 'config.bucket_lengths must be a list'),
    ({'shapes': 3}, 'config.shapes must be a group of fields'),
  ],
)
def test_bad_fields_are_named_with_the_expected_type(values, message):
  with pytest.raises(errors.UserError, match=message):
    config_checks.from_values(values, 'config.json')


def test_a_saved_config_lacking_newer_fields_takes_their_defaults():
  config = config_checks.from_values({'batch_size': 8}, 'config.json')
  assert config.batch_size == 8
  assert config.units == default.get_config().units


def test_a_workdir_config_with_an_unknown_field(workdir):
  _edit_config(workdir, colour='red')
  with pytest.raises(
    errors.UserError, match=r"config.json: unknown config field 'colour'"
  ):
    inference.load_trained(workdir)


@pytest.mark.parametrize('name', ['config.json', 'vocab.json', 'features.json'])
def test_bad_json_names_its_file(workdir, name):
  (workdir / name).write_text('{"oops": ')
  with pytest.raises(errors.UserError, match=f'cannot read .*{name}'):
    inference.load_trained(workdir)


def test_sample_names_a_field_of_the_wrong_type_in_one_line(workdir):
  _edit_config(workdir, units='many')
  image = next((workdir / 'examples').glob('*.png'))
  result = subprocess.run(
    [sys.executable, '-m', 'capjax.sample', f'--workdir={workdir}', str(image)],
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
    f'error: {workdir / "config.json"}: config.units must be an integer, '
    "got 'many'"
  )
  assert 'Traceback' not in result.stderr


def test_every_string_field_is_a_checked_choice_or_free():
  config = default.get_config()
  strings = {name for name in config if isinstance(config[name], str)}
  assert strings == set(config_checks.CHOICES) | _FREE_STRINGS
  for name, choices in config_checks.CHOICES.items():
    assert config[name] in choices  # the default is one of them


def test_every_choice_is_one_its_module_acts_on():
  # The modules assume a checked config: each choice must mean something.
  config = default.get_config()
  for dtype in config_checks.CHOICES['dtype']:
    config.dtype = dtype
    assert captioner.from_config(config, 10).dtype == jnp.dtype(dtype)
  for schedule in config_checks.CHOICES['schedule']:
    config.schedule = schedule
    state_lib.make_optimizer(config)
  flickr = set(datasets._FLICKR_SPLIT_LISTS) | {'all'}  # noqa: SLF001
  assert flickr == set(config_checks.SPLITS['flickr'])


def _refusal(field, value, choices):
  return f'config.{field} must be one of {", ".join(choices)}, got {value!r}'


_BAD_CHOICES = [
  (name, 'nope', _refusal(name, 'nope', choices))
  for name, choices in config_checks.CHOICES.items()
] + [
  (
    'eval_split',
    'dev',
    "config.eval_split 'dev': unknown shapes split 'dev'; use one of "
    'train, val, test, joined with "+"',
  ),
  (
    'train_split',
    'train+',
    'config.train_split \'train+\': use names joined with "+", e.g. '
    '"train+restval"',
  ),
  (
    'extractor_weights',
    'no/such.h5',
    'config.extractor_weights must be one of imagenet, none or an existing '
    "weights file, got 'no/such.h5'",
  ),
  (
    'init_from',
    'no/such/run',
    "config.init_from must be a workdir, got 'no/such/run': no such directory",
  ),
]


@pytest.mark.parametrize(
  'field, value, message', _BAD_CHOICES, ids=[c[0] for c in _BAD_CHOICES]
)
def test_training_refuses_each_bad_choice_before_any_work(
  tmp_path, field, value, message
):
  overrides = {field: value}
  if field == 'extractor_weights':
    overrides['extractor'] = 'inception_v3'
  config = testing_lib.tiny_config(tmp_path / 'shapes', **overrides)
  with pytest.raises(errors.UserError) as refused:
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert str(refused.value) == message
  # Nothing written, generated or extracted.
  assert sorted(tmp_path.iterdir()) == []


def test_training_refuses_a_bad_type_before_any_work(tmp_path):
  # A config file may build any value; ConfigDict fixes a field's type only
  # once set.
  values = testing_lib.tiny_config(tmp_path / 'shapes').to_dict()
  config = ml_collections.ConfigDict(dict(values, batch_size='8'))
  with pytest.raises(errors.UserError) as refused:
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert str(refused.value) == "config.batch_size must be an integer, got '8'"
  assert sorted(tmp_path.iterdir()) == []


def test_the_train_program_says_a_bad_choice_in_one_line(tmp_path):
  workdir = tmp_path / 'run'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'capjax.train',
      f'--workdir={workdir}',
      f'--config.data_dir={tmp_path / "shapes"}',
      '--config.dtype=float16',
    ],
    capture_output=True,
    text=True,
    cwd=testing_lib.REPO_ROOT,
    timeout=120,
    check=False,
  )
  assert result.returncode == 1
  assert result.stderr.splitlines() == [
    "error: config.dtype must be one of float32, bfloat16, got 'float16'"
  ]
  assert sorted(tmp_path.iterdir()) == []


def test_a_workdir_config_with_a_bad_choice_names_its_file(workdir):
  _edit_config(workdir, schedule='linear')
  with pytest.raises(errors.UserError) as refused:
    inference.load_trained(workdir)
  assert str(refused.value) == (
    f'{workdir / "config.json"}: '
    + _refusal('schedule', 'linear', config_checks.CHOICES['schedule'])
  )
