"""A tiny training setup for tests: a config, its flags, a subprocess run."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
from orbax import checkpoint as ocp

from capjax import workdir as workdir_lib
from capjax.configs import default
from capjax.model import captioner
from capjax.model import inception
from capjax.training import checkpoints
from capjax.training import state as state_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def tiny_config(shapes_dir: pathlib.Path, **overrides):
  """A config that trains a tiny model on a small `shapes` set in seconds."""
  config = default.get_config()
  config.data_dir = str(shapes_dir)
  config.shapes.num_train = 48
  config.shapes.num_val = 8
  config.shapes.num_test = 8
  config.embedding_dim = 16
  config.units = 24
  config.schedule = 'constant'
  config.learning_rate = 1e-3
  config.batch_size = 8
  config.num_train_steps = 12
  config.log_every_steps = 4
  config.eval_every_steps = 6
  config.checkpoint_every_steps = 4
  config.num_eval_examples = 16
  config.bucket_lengths = (24, 48)
  for key, value in overrides.items():
    config[key] = value
  return config


def config_flags(config) -> list[str]:
  """The command-line overrides that reproduce `tiny_config`'s fields."""
  flags = []
  for key in (
    'data_dir',
    'embedding_dim',
    'units',
    'schedule',
    'learning_rate',
    'batch_size',
    'num_train_steps',
    'log_every_steps',
    'eval_every_steps',
    'checkpoint_every_steps',
    'num_eval_examples',
    'keep_checkpoints',
    'num_caption_eval_images',
  ):
    flags.append(f'--config.{key}={config[key]}')
  for key in ('num_train', 'num_val', 'num_test'):
    flags.append(f'--config.shapes.{key}={config.shapes[key]}')
  flags.append('--config.bucket_lengths=(24,48)')
  return flags


def start_train(workdir, config, *, env=None, extra=()) -> subprocess.Popen:
  """`python -m capjax.train` running in the background, its output piped."""
  return subprocess.Popen(
    [
      sys.executable,
      '-m',
      'capjax.train',
      f'--workdir={workdir}',
      *config_flags(config),
      *extra,
    ],
    cwd=REPO_ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    env=dict(os.environ, **(env or {})),
  )


def wait_for_line(process: subprocess.Popen, text: str) -> str | None:
  """The first line of the process's stderr holding `text`; None at its end."""
  assert process.stderr is not None, 'started without stderr=PIPE'
  for line in process.stderr:
    if text in line:
      return line
  return None


def run_train(workdir, config, *, env=None, extra=(), **kwargs):
  return subprocess.run(
    [
      sys.executable,
      '-m',
      'capjax.train',
      f'--workdir={workdir}',
      *config_flags(config),
      *extra,
    ],
    env=dict(os.environ, **(env or {})),
    capture_output=True,
    text=True,
    cwd=REPO_ROOT,
    **kwargs,
  )


def leaves_equal(a, b, atol=0.0):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def write_inception_workdir(workdir: pathlib.Path, config, vocab) -> None:
  """A workdir of random parameters for InceptionV3 features.

  `config` names the extractor (e.g. inception_v3 with 'none' weights);
  the workdir holds it, the vocabulary, the features' description and the
  step-0 checkpoint, as training leaves them.
  """
  shape_LD = (inception.NUM_LOCATIONS, inception.FEATURE_DIM)
  state = state_lib.create_train_state(
    captioner.from_config(config, vocab.size),
    state_lib.make_optimizer(config),
    shape_LD,
    config.seed,
  )
  workdir.mkdir()
  workdir_lib.save_config(workdir, config)
  vocab.save(workdir / workdir_lib.VOCAB_FILE)
  workdir_lib.save_json(
    workdir / workdir_lib.FEATURES_FILE,
    {
      'extractor': {
        'name': config.extractor,
        'weights': config.extractor_weights,
        'backend': config.extractor_backend,
      },
      'num_locations': shape_LD[0],
      'feature_dim': shape_LD[1],
    },
  )
  manager = checkpoints.manager(workdir)
  manager.save(0, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  manager.close()
