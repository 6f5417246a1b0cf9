"""Shared test fixtures."""

import pathlib

import jax
from jax.experimental.compilation_cache import compilation_cache as cc
import pytest

from capjax.testing import real_data
from capjax.training import loop


@pytest.fixture(scope='session')
def shared_data() -> pathlib.Path:
  """Directory of real COCO/Flickr8k test data; skips the test when absent."""
  path = real_data.find()
  if path is None:
    pytest.skip(
      f'real test data not found: set {real_data.ENV} to a directory '
      'holding coco-mini/, flickr8k/ and flickr8k-1k/'
    )
  return path


@pytest.fixture(scope='module')
def compilation_cache(tmp_path_factory):
  """JAX's persistent compilation cache, on for one module's tests.

  For modules that run the training loop many times: each run jits its
  steps afresh, and compiles the same programs again unless they are in
  the cache. Every program still compiles once; what a test computes does
  not change. Yields the cache's directory, which subprocesses may share
  (`capjax.testing.serving.compilation_cache_env`).
  """
  directory = tmp_path_factory.mktemp('jax-cache')
  settings = {
    'jax_compilation_cache_dir': str(directory),
    'jax_persistent_cache_min_compile_time_secs': 0,
    'jax_persistent_cache_min_entry_size_bytes': 0,
  }
  saved = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  cc.reset_cache()  # the cache is looked up once per process, on first use
  yield directory
  for name, value in saved.items():
    jax.config.update(name, value)
  cc.reset_cache()


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory) -> pathlib.Path:
  """A workdir of a small model trained on `shapes` for 200 steps.

  Trained once per session (about 10 s on 2 CPU cores); enough for real
  shapes captions ("a small red square"). Tests may add files to it but must
  not change or remove what is there.
  """
  from capjax.configs import default  # noqa: PLC0415

  root = tmp_path_factory.mktemp('trained')
  config = default.get_config()
  config.data_dir = str(root / 'shapes')
  config.shapes.num_train, config.shapes.num_val = 64, 16
  config.shapes.num_test = 16
  config.embedding_dim, config.units = 16, 32
  config.batch_size = 16
  config.schedule = 'constant'
  config.learning_rate = 3e-3
  config.num_train_steps = 200
  config.log_every_steps = 100
  config.eval_every_steps = config.checkpoint_every_steps = 200
  workdir = root / 'workdir'
  loop.train_and_evaluate(config, str(workdir))
  return workdir
