"""The time-to-quality benchmark: one problem, several trainers, a level."""

import numpy as np

from capjax.benchmarks import report
from capjax.benchmarks import time_to_quality as ttq
from capjax.data import feature_store

WORDS = 'a dog cat runs sits on the grass red ball jumps'.split()


def _flickr_data(tmp_path, num_train=24, num_val=6, seed=0):
  """Flickr8k-format captions and split lists, with a feature store."""
  rng = np.random.default_rng(seed)
  names = [f'img{i}.jpg' for i in range(num_train + num_val)]
  # One caption length: one compiled step for each trainer.
  lines = [
    f'{n}#{k}\t' + ' '.join(rng.choice(WORDS, 3))
    for n in names
    for k in range(5)
  ]
  data_dir = tmp_path / 'data'
  data_dir.mkdir()
  (data_dir / 'Flickr8k.token.txt').write_text('\n'.join(lines) + '\n')
  (data_dir / 'Flickr_8k.trainImages.txt').write_text(
    '\n'.join(names[:num_train]) + '\n'
  )
  (data_dir / 'Flickr_8k.devImages.txt').write_text(
    '\n'.join(names[num_train:]) + '\n'
  )
  feature_dir = tmp_path / 'features'
  for split, split_names in (
    ('train', names[:num_train]),
    ('val', names[num_train:]),
  ):
    feature_store.write_feature_store(
      feature_store.store_dir(feature_dir, split),
      rng.random((len(split_names), 4, 6)).astype(np.float32),
      [n.removesuffix('.jpg') for n in split_names],
      {'name': 'random'},
    )
  return str(data_dir), str(feature_dir)


def _small_config(tmp_path):
  config = ttq.flickr_config(*_flickr_data(tmp_path))
  config.embedding_dim, config.units, config.batch_size = 8, 16, 8
  return config


def test_all_start_from_the_same_model_and_learn(tmp_path):
  config = _small_config(tmp_path)
  result = ttq.bench_time_to_quality(
    config, target_loss=0.0, max_seconds=1e9, eval_every=2, max_steps=4
  )
  names = ['tutorial', *ttq.VARIANTS]
  # The same weights and the same model give the same validation loss on
  # the same captions. (A carried GRU state reads the same weights
  # differently from the second token on.)
  np.testing.assert_allclose(
    result['capjax']['curve']['val_loss'][0],
    result['tutorial']['curve']['val_loss'][0],
    rtol=1e-5,
  )
  for name in names:
    curve = result[name]['curve']
    assert curve['steps'] == [0, 2, 4]
    assert np.all(np.diff(curve['seconds']) > 0)
    # Each learns the captions: the loss falls.
    assert curve['val_loss'][-1] < curve['val_loss'][0]
    assert result[name]['steps_to_target'] is None  # 0 is out of reach
  rows = report.time_to_quality_rows(result)
  assert len(rows) == len(ttq.VARIANTS)
  assert rows[0][1:4] == ['not reached in 1000000000'] * 2 + ['']


def test_the_time_to_quality_is_the_first_evaluation_at_or_below_it():
  curve = ttq.Curve(
    steps=[0, 20, 40, 60],
    seconds=[0.0, 9.0, 19.0, 30.0],
    val_loss=[7.0, 3.5, 3.2, 3.1],
  )
  assert curve.first_at_or_below(3.2) == (40, 19.0)
  assert curve.first_at_or_below(3.0) is None
  q = {
    'target_loss': 3.2,
    'train_captions': 3810,
    'batch_size': 64,
    'max_seconds': 600.0,
    'variants': {'capjax': {}},
    'capjax': {'seconds_to_target': 19.0},
    'tutorial': {'seconds_to_target': 114.0},
  }
  assert report.time_to_quality_rows(q)[0][1:] == [
    '19',
    '114',
    '6.0x',
    '>= 5x',
    'yes',
  ]
  q['tutorial']['seconds_to_target'] = None
  assert report.time_to_quality_rows(q)[0][2:] == [
    'not reached in 600',
    '> 31.6x',
    '>= 5x',
    'yes',
  ]
