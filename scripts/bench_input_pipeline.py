r"""Benchmarks the input pipeline and feature extraction on this machine's CPU.

  python scripts/bench_input_pipeline.py [--num_images=500] [--batch_size=64]

Input pipeline: examples/s of capjax's pipeline (feature store, with and
without config.cache_features) against the tutorial's (one .npy file per image,
float32 as the tutorial saved them, read by `tf.numpy_function` once per
caption, shuffle(1000), batch), on the same random (L, D) features and
captions. Both are consumed as numpy arrays, as a JAX training loop does.

Extraction: images/s of `patches` on generated shapes PNGs and of
`inception_v3` (random weights) on synthetic 640x480 JPEGs, decoding
included, model build excluded.

Prints one JSON object with all numbers.
"""

import json
import os
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image
import tensorflow as tf

from capjax import datasets
from capjax import features
from capjax import input_pipeline
from capjax import vocab as vocab_lib
from capjax.configs import default

_NUM_IMAGES = flags.DEFINE_integer('num_images', 500, 'Images (5 captions '
                                   'each) for the pipeline benchmark.')
_NUM_LOCATIONS = flags.DEFINE_integer('num_locations', 64, 'L.')
_FEATURE_DIM = flags.DEFINE_integer('feature_dim', 2048, 'D.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Batch size.')
_NUM_BATCHES = flags.DEFINE_integer('num_batches', 200, 'Batches timed.')
_PATCH_IMAGES = flags.DEFINE_integer('patch_images', 1000, 'Shapes images '
                                     'for the patches extractor.')
_INCEPTION_IMAGES = flags.DEFINE_integer('inception_images', 64, 'JPEGs for '
                                         'InceptionV3 (0 skips it).')
_TUTORIAL_SHUFFLE = 1000
_CAPTIONS_PER_IMAGE = 5


def _timed(iterator, num_batches: int, batch_size: int) -> float:
  """Examples/s over num_batches batches, after two warm-up batches."""
  for _ in range(2):
    next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  return num_batches * batch_size / (time.perf_counter() - start)


def _captions(rng, num_images: int) -> list[datasets.Record]:
  words = [f'word{i}' for i in range(1000)]
  return [datasets.Record(f'img{i}', None, tuple(
      ' '.join(rng.choice(words, size=rng.integers(8, 20)))
      for _ in range(_CAPTIONS_PER_IMAGE))) for i in range(num_images)]


def _tutorial_iterator(directory, examples, batch_size):
  """The tutorial's pipeline: a .npy file per image, loaded per caption."""
  names = [os.path.join(directory, f'{i}') for i in examples.image_index]
  tokens = examples.tokens  # the tutorial padded every caption to the longest

  def map_func(img_name, cap):
    img_tensor = np.load(img_name.decode('utf-8') + '.npy')
    return img_tensor, cap

  def epochs():
    while True:
      dataset = tf.data.Dataset.from_tensor_slices((names, tokens))
      dataset = dataset.map(
          lambda item1, item2: tf.numpy_function(
              map_func, [item1, item2], [tf.float32, tf.int32]),
          num_parallel_calls=tf.data.AUTOTUNE)
      dataset = dataset.shuffle(_TUTORIAL_SHUFFLE).batch(batch_size)
      dataset = dataset.prefetch(buffer_size=tf.data.AUTOTUNE)
      yield from dataset.as_numpy_iterator()

  return epochs()


def bench_pipeline(tmp: str) -> dict[str, float]:
  rng = np.random.default_rng(0)
  n, batch_size = _NUM_IMAGES.value, _BATCH_SIZE.value
  grids = rng.normal(size=(n, _NUM_LOCATIONS.value, _FEATURE_DIM.value))
  grids = grids.astype(np.float16)
  ids = [f'img{i}' for i in range(n)]
  store = features.write_feature_store(os.path.join(tmp, 'store'), grids, ids,
                                       {'name': 'random'})
  records = _captions(rng, n)
  vocab = vocab_lib.Vocab.build([c for r in records for c in r.captions],
                                5000)
  config = default.get_config()
  examples = input_pipeline.make_examples(store, records, vocab,
                                          config.max_caption_len)
  npy_dir = os.path.join(tmp, 'npy')
  os.makedirs(npy_dir)
  for i in range(n):
    np.save(os.path.join(npy_dir, f'{i}.npy'), grids[i].astype(np.float32))

  results = {}
  for cache in (False, True):
    batches = input_pipeline.TrainBatches(
        examples, batch_size=batch_size, seed=0,
        bucket_lengths=config.bucket_lengths,
        shuffle_buffer=config.shuffle_buffer, cache_features=cache)
    results[f'capjax_cache_{cache}'] = _timed(
        batches.iterator(), _NUM_BATCHES.value, batch_size)
  results['tutorial_npy_per_image'] = _timed(
      _tutorial_iterator(npy_dir, examples, batch_size), _NUM_BATCHES.value,
      batch_size)
  return results


def _extraction_rate(config, split: str, feature_dir: str,
                     extractor: features.Extractor) -> float:
  extractor(np.zeros((1, 8, 8, 3), np.uint8))  # build and trace first
  start = time.perf_counter()
  store = features.extract_split(config, split, feature_dir, extractor)
  return len(store) / (time.perf_counter() - start)


def bench_extraction(tmp: str) -> dict[str, float]:
  config = default.get_config()
  config.data_dir = os.path.join(tmp, 'shapes')
  config.shapes.num_train = _PATCH_IMAGES.value
  datasets.load_split(config, 'train')  # generate the PNGs untimed
  results = {'patches': _extraction_rate(
      config, 'train', os.path.join(tmp, 'f_patches'),
      features.make_extractor(config))}
  if _INCEPTION_IMAGES.value:
    image_dir = os.path.join(tmp, 'jpegs')
    os.makedirs(image_dir)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 640)[None, :, None]
    for i in range(_INCEPTION_IMAGES.value):
      pixels = ramp + rng.integers(0, 55, size=(480, 640, 3))
      Image.fromarray(pixels.astype(np.uint8)).save(
          os.path.join(image_dir, f'{i}.jpg'), quality=90)
    annotations = {
        'images': [{'id': i, 'file_name': f'{i}.jpg'}
                   for i in range(_INCEPTION_IMAGES.value)],
        'annotations': [{'id': i, 'image_id': i, 'caption': 'noise'}
                        for i in range(_INCEPTION_IMAGES.value)]}
    with open(os.path.join(tmp, 'jpegs.json'), 'w') as f:
      json.dump(annotations, f)
    config.dataset = 'coco_json'
    config.data_dir = tmp
    config.extractor = 'inception_v3'
    config.extractor_weights = 'none'
    results['inception_v3'] = _extraction_rate(
        config, 'jpegs.json:jpegs', os.path.join(tmp, 'f_inception'),
        features.make_extractor(config))
  return results


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    report = {
        'pipeline_examples_per_s': bench_pipeline(tmp),
        'extraction_images_per_s': bench_extraction(tmp),
        'settings': {
            'num_images': _NUM_IMAGES.value,
            'captions_per_image': _CAPTIONS_PER_IMAGE,
            'features_LD': [_NUM_LOCATIONS.value, _FEATURE_DIM.value],
            'batch_size': _BATCH_SIZE.value,
            'num_batches': _NUM_BATCHES.value, 'cpus': os.cpu_count()},
    }
  print(json.dumps(report, indent=2))


if __name__ == '__main__':
  app.run(main)
