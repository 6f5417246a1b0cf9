"""Training captions/s: capjax's jitted step against the tutorial's, at fixed
lengths and on the real lengths of the Flickr8k training captions.

capjax batches the real captions as its input pipeline does with the default
config (each batch padded to the smallest bucket that fits it), with random
batches and with group_by_length, so its rate is B / E[step time] over the
buckets' frequencies in two epochs of batches; the tutorial pads every
caption to the longest.
"""

from typing import Any

from absl import logging
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from capjax.benchmarks import flops
from capjax.benchmarks import harness
from capjax.benchmarks import tutorial
from capjax.benchmarks import workload
from capjax.configs import default
from capjax.data import datasets
from capjax.data import schedule
from capjax.data import vocab as vocab_lib
from capjax.testing import real_data

LENGTHS = (16, 32, 48)


def flickr8k_train_captions() -> tuple[np.ndarray, np.ndarray] | None:
  """(tokens per Flickr8k training caption, <start> and <end> too; image)."""
  data = real_data.find()
  flickr = data / 'flickr8k' if data else None
  if flickr is None or not (flickr / 'Flickr_8k.trainImages.txt').exists():
    return None
  captions = datasets.read_flickr_tokens(flickr / 'Flickr8k.token.txt')
  names = (flickr / 'Flickr_8k.trainImages.txt').read_text().split()
  pairs = [
    (len(vocab_lib.tokenize(c)) + 2, i)
    for i, n in enumerate(names)
    for c in captions.get(n, ())
  ]
  lengths, images = zip(*pairs)
  return np.array(lengths, np.int32), np.array(images, np.int32)


def bucket_frequencies(
  lengths: np.ndarray, image_index: np.ndarray, config
) -> dict[int, float]:
  """How often each bucket pads capjax's training batches of these captions.

  The batches are those capjax.data.schedule makes with the config's
  buckets, shuffling and length grouping, over two epochs.
  """
  batch_schedule = schedule.BatchSchedule(
    lengths,
    image_index,
    batch_size=workload.BATCH_SIZE,
    seed=config.seed,
    bucket_lengths=config.bucket_lengths,
    shuffle_buffer=config.shuffle_buffer,
    group_by_length=config.group_by_length,
  )
  steps = 2 * batch_schedule.steps_per_epoch
  counts = np.bincount([batch_schedule.caption_length(s) for s in range(steps)])
  return {t: float(counts[t] / steps) for t in np.flatnonzero(counts).tolist()}


def bench_training(repeats: int) -> dict[str, Any]:
  """Captions/s of both trainers at fixed lengths and on real lengths."""
  capjax_trainer = workload.CapjaxTrainer()
  tutorial_trainer = tutorial.TutorialTrainer()
  rng = np.random.default_rng(0)
  features = workload.random_features(rng, workload.BATCH_SIZE)
  features_jax, features_tf = jnp.asarray(features), tf.constant(features)
  flickr8k = flickr8k_train_captions()
  if flickr8k is None:
    logging.warning(
      'Flickr8k captions not found ($CAPJAX_TEST_DATA or '
      '../shared/data): skipping the real-lengths row'
    )
    mixes, tutorial_length = {}, None
  else:
    lengths, image_index = flickr8k
    config = default.get_config()
    grouped = config.copy_and_resolve_references()
    grouped.group_by_length = True
    mixes = {
      name: bucket_frequencies(lengths, image_index, c)
      for name, c in (
        ('flickr8k_lengths', config),
        ('flickr8k_lengths_grouped', grouped),
      )
    }
    tutorial_length = int(lengths.max())

  def time_length(length, tutorial=True):
    tokens = workload.random_tokens(rng, length)
    batch = {'features': features_jax, 'tokens': jnp.asarray(tokens)}
    fns = {'capjax': lambda: capjax_trainer(batch)}
    if tutorial:
      tokens_tf = tf.constant(tokens)
      fns['tutorial'] = lambda: tutorial_trainer(features_tf, tokens_tf)
    logging.info('training, T=%d', length)
    return harness.interleaved_medians(fns, repeats)

  step_s = {t: time_length(t) for t in LENGTHS}
  results: dict[str, Any] = {
    'fixed_length': {
      t: {
        'capjax_captions_per_s': workload.BATCH_SIZE / s['capjax'],
        'tutorial_captions_per_s': workload.BATCH_SIZE / s['tutorial'],
        'capjax_step_s': s['capjax'],
        'tutorial_step_s': s['tutorial'],
        'capjax_model_flops': flops.train_flops(t),
      }
      for t, s in step_s.items()
    }
  }
  if mixes:
    for t in sorted({t for buckets in mixes.values() for t in buckets}):
      if t not in step_s:
        step_s[t] = time_length(t, tutorial=False)
    tutorial_s = time_length(tutorial_length)['tutorial']
    for name, buckets in mixes.items():
      capjax_s = sum(f * step_s[t]['capjax'] for t, f in buckets.items())
      results[name] = {
        'capjax_captions_per_s': workload.BATCH_SIZE / capjax_s,
        'tutorial_captions_per_s': workload.BATCH_SIZE / tutorial_s,
        'capjax_bucket_frequencies': buckets,
        'capjax_bucket_step_s': {t: step_s[t]['capjax'] for t in buckets},
        'tutorial_length': tutorial_length,
        'num_captions': len(lengths),
        'mean_length': float(lengths.mean()),
      }
  return results
