"""The named experiments load and only set fields the default config has."""

import importlib.util
import pathlib

import pytest

from capjax.configs import default
from capjax.model import captioner

EXPERIMENTS = sorted(
  (pathlib.Path(__file__).resolve().parent.parent / 'experiments').glob('*.py')
)


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_three_named_experiments_exist():
  assert {p.stem for p in EXPERIMENTS} >= {
    'coco_inception',
    'flickr8k_inception',
    'shapes',
  }


@pytest.mark.parametrize('path', EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_is_a_valid_config(path):
  module = _load(path)
  config = module.get_config()
  assert set(config.keys()) == set(default.get_config().keys())
  assert config.bucket_lengths[-1] == config.max_caption_len
  captioner.from_config(config, vocab_size=config.top_k + 4)
  # The docstring holds the command lines that run it.
  assert 'python -m capjax.train' in module.__doc__
  assert f'experiments/{path.name}' in module.__doc__


def test_coco_inception_is_the_tutorial_setup():
  config = _load(
    next(p for p in EXPERIMENTS if p.stem == 'coco_inception')
  ).get_config()
  assert (config.dataset, config.train_split, config.extractor) == (
    'tfds_coco',
    'train+restval',
    'inception_v3',
  )
  assert (
    config.top_k,
    config.embedding_dim,
    config.units,
    config.batch_size,
    config.schedule,
    config.learning_rate,
  ) == (5000, 256, 512, 64, 'constant', 1e-3)
