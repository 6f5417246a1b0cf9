"""Input pipeline examples/s: capjax's training batches against the tutorial's
one float32 .npy file per image, read by `tf.numpy_function` once per caption,
on the same data.
"""

import functools
import pathlib

import numpy as np
import tensorflow as tf

from capjax.benchmarks import harness
from capjax.benchmarks import workload
from capjax.configs import default
from capjax.data import datasets
from capjax.data import feature_store
from capjax.data import input_pipeline
from capjax.data import schedule
from capjax.data import vocab as vocab_lib

_CAPTIONS_PER_IMAGE = 5
_TUTORIAL_SHUFFLE = 1000


def _random_records(
  rng: np.random.Generator, num_images: int
) -> list[datasets.Record]:
  words = [f'word{i}' for i in range(1000)]
  return [
    datasets.Record(
      f'img{i}',
      None,
      tuple(
        ' '.join(rng.choice(words, size=rng.integers(8, 20)))
        for _ in range(_CAPTIONS_PER_IMAGE)
      ),
    )
    for i in range(num_images)
  ]


def _tutorial_batches(npy_dir: pathlib.Path, examples: input_pipeline.Examples):
  """The tutorial's pipeline: a .npy file per image, loaded per caption."""
  names = [str(npy_dir / f'{i}') for i in examples.image_index]
  tokens = examples.tokens  # the tutorial padded every caption to the longest

  def map_func(img_name, cap):
    img_tensor = np.load(img_name.decode('utf-8') + '.npy')
    return img_tensor, cap

  while True:
    dataset = tf.data.Dataset.from_tensor_slices((names, tokens))
    dataset = dataset.map(
      lambda item1, item2: tf.numpy_function(
        map_func, [item1, item2], [tf.float32, tf.int32]
      ),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
    dataset = dataset.shuffle(_TUTORIAL_SHUFFLE).batch(workload.BATCH_SIZE)
    dataset = dataset.prefetch(buffer_size=tf.data.AUTOTUNE)
    yield from dataset.as_numpy_iterator()


def _next_batches(iterator, n: int) -> list:
  return [next(iterator) for _ in range(n)]


def bench_pipeline(
  tmp: pathlib.Path, repeats: int, num_images: int, num_batches: int
) -> dict[str, float]:
  """Examples/s of capjax's training batches and of the tutorial's."""
  rng = np.random.default_rng(0)
  grids = rng.normal(
    size=(num_images, workload.NUM_LOCATIONS, workload.FEATURE_DIM)
  ).astype(np.float16)
  store = feature_store.write_feature_store(
    tmp / 'store',
    grids,
    [f'img{i}' for i in range(num_images)],
    {'name': 'random'},
  )
  records = _random_records(rng, num_images)
  vocab = vocab_lib.Vocab.build(
    [c for r in records for c in r.captions], workload.VOCAB_SIZE - 1
  )
  config = default.get_config()
  examples = input_pipeline.make_examples(
    store, records, vocab, config.max_caption_len
  )
  npy_dir = tmp / 'npy'
  npy_dir.mkdir()
  for i in range(num_images):
    # The tutorial saved the float32 InceptionV3 outputs as they were.
    np.save(npy_dir / f'{i}.npy', grids[i].astype(np.float32))

  iterators = {'tutorial_npy_per_image': _tutorial_batches(npy_dir, examples)}
  for cache in (False, True):
    batch_schedule = schedule.BatchSchedule(
      examples.lengths,
      examples.image_index,
      batch_size=workload.BATCH_SIZE,
      seed=0,
      bucket_lengths=config.bucket_lengths,
      shuffle_buffer=config.shuffle_buffer,
    )
    iterators[f'capjax_cache_{cache}'] = input_pipeline.TrainBatches(
      examples, batch_schedule, cache_features=cache
    ).iterator()
  seconds = harness.interleaved_medians(
    {
      name: functools.partial(_next_batches, it, num_batches)
      for name, it in iterators.items()
    },
    repeats,
  )
  return {
    name: num_batches * workload.BATCH_SIZE / s for name, s in seconds.items()
  }
