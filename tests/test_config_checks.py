"""Configs and workdir files: unknown fields, wrong types, bad JSON, named."""

import json
import shutil
import subprocess
import sys

import pytest

from capjax import config_checks
from capjax import errors
from capjax import inference
from capjax.configs import default


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
